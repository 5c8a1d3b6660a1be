# nooelint: oelint.var.suggestedvar.BUGTRACKER
# Suppressed above: petrestore has no public bug tracker (see the petrestore
# recipe).
SUMMARY = "petrestore appliance: the daemon and its inference runtime"
DESCRIPTION = "Adds the petrestore daemon to an image, with ONNX Runtime \
               where a layer provides it and, on Tegra (Jetson) machines, \
               the TensorRT runtime libraries used for GPU inference."
SECTION = "base"
# No source and no licence text of its own: a package group only names other
# packages. The class's default licence (MIT) applies.

# The recommendations below depend on the machine (tegra override), so the
# package is machine specific. Set before inheriting packagegroup, which
# otherwise makes it allarch.
PACKAGE_ARCH = "${MACHINE_ARCH}"

inherit packagegroup

RDEPENDS:${PN} = "petrestore"

# Recommendations, not dependencies: without them the daemon restores with
# its built-in tract engine on the CPU. bitbake stops with "Nothing
# RPROVIDES" on a recommendation that no recipe provides, so each is named
# only where its provider is in the build.
# - ONNX Runtime: PETRESTORE_ORT_PACKAGE, see conf/layer.conf ("onnxruntime"
#   with a meta-onnxruntime layer, CPU only; meta-tegra-community provides
#   it, with the CUDA and TensorRT execution providers, from whinlatter on).
RRECOMMENDS:${PN} = "${PETRESTORE_ORT_PACKAGE}"
# - tensorrt-core (libnvinfer): meta-tegra, recipes-devtools/gie.
# - tensorrt-plugins (libnvinfer_plugin): meta-tegra, the prebuilt package by
#   default (tensorrt-plugins-prebuilt RPROVIDES it) or the source build in
#   its openembedded-layer dynamic layer.
# meta-tegra's TensorRT recipes need "opengl" in DISTRO_FEATURES and are
# skipped without it, hence the condition. "tegra" is in MACHINEOVERRIDES of
# every meta-tegra machine (conf/machine/include/tegra-common.inc);
# oelint-adv has no data on meta-tegra and does not know that override.
# nooelint: oelint.vars.specific
RRECOMMENDS:${PN}:append:tegra = " ${@bb.utils.contains('DISTRO_FEATURES', 'opengl', 'tensorrt-core tensorrt-plugins', '', d)}"
