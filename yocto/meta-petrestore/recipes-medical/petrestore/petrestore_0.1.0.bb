# nooelint: oelint.var.mandatoryvar.HOMEPAGE, oelint.var.suggestedvar.BUGTRACKER, oelint.var.bbclassextend
# The findings suppressed on the line above concern the whole file:
# - HOMEPAGE, BUGTRACKER: petrestore has no public web site and no public bug
#   tracker; an invented address would end up in the package metadata. A
#   distribution that has them sets HOMEPAGE:pn-petrestore and
#   BUGTRACKER:pn-petrestore in its distro config.
# - BBCLASSEXTEND: a daemon for the target only (systemd unit, system
#   account); a native or nativesdk variant has no use.
SUMMARY = "PET short-frame restoration daemon for a scanner-side edge box"
DESCRIPTION = "petrestore receives PET series over DICOM, restores short-frame \
               series with a trained model (ONNX Runtime with TensorRT/CUDA when \
               present, a pure-Rust engine otherwise) and sends the restored \
               series on. It runs as a systemd service under its own system \
               account."
SECTION = "console/utils"

# petrestore's own code is Apache-2.0 (LICENSE at the top of the source
# tree). The binary also links Rust crates statically; THIRD-PARTY.md lists
# each with the licence its Cargo.toml declares (all permissive, checked in
# CI by scripts/licences.py). Where a crate offers a choice, Apache-2.0 or
# MIT is taken; the licences that remain are listed here so that the image's
# licence manifest covers the binary, and THIRD-PARTY.md is installed in
# ${PN}-doc. Unicode-3.0's text is not in every oe-core release this layer
# supports (scarthgap lacks it, and its SPDX step stops without it): the
# layer ships it (licenses/, LICENSE_PATH in conf/layer.conf).
LICENSE = "Apache-2.0 & MIT & ISC & BSD-3-Clause & CC0-1.0 & Unicode-3.0 & Zlib"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# cve-check looks petrestore itself up under this name. The crates linked
# into the binary are not covered by it; check them against Cargo.lock with a
# Rust advisory tool (e.g. cargo audit).
CVE_PRODUCT = "petrestore"

# ---- Source ----
# The source is not published. Point the recipe at your git server (local.conf,
# distro config or a bbappend):
#   PETRESTORE_GIT_URI = "git://git.example.org/petrestore.git;protocol=ssh;branch=main"
#   SRCREV:pn-petrestore = "<full commit hash>"
# or build a checkout with externalsrc (see README.md). Without either the
# recipe is skipped with a message saying so.
PETRESTORE_GIT_URI ??= ""
SRC_URI = "${PETRESTORE_GIT_URI}"

# The git fetcher unpacks into ${UNPACKDIR}/git (styhead and walnascar:
# UNPACKDIR is set by bitbake.conf). scarthgap has no UNPACKDIR and unpacks
# into ${WORKDIR}; the anonymous function below gives it that value there.
# UNPACKDIR must not get a default in this file: any assignment here (??= or
# ?=) replaces bitbake.conf's, and insane.bbclass then stops the build with
# "Using UNPACKDIR = ${WORKDIR} is not supported".
S = "${UNPACKDIR}/git"

# Needed at parse time: the UNPACKDIR fallback for scarthgap, and skipping the
# recipe with a clear message when no source is configured (instead of a
# failing do_fetch).
# nooelint: oelint.task.noanonpython
python __anonymous () {
    if not d.getVar('UNPACKDIR'):
        d.setVar('UNPACKDIR', '${WORKDIR}')
    if not d.getVar('PETRESTORE_GIT_URI') and not d.getVar('EXTERNALSRC'):
        raise bb.parse.SkipRecipe("set PETRESTORE_GIT_URI and SRCREV, or EXTERNALSRC (see meta-petrestore/README.md)")
}

# ---- Locked crates (offline build) ----
# One crate:// SRC_URI entry with its sha256 for every registry package of
# Cargo.lock. do_fetch downloads and verifies them; the cargo class points
# cargo at those vendored copies and builds with --frozen, so do_compile needs
# no network and cannot pick versions other than the locked ones.
# Generated: `python3 scripts/yocto-crates.py` in the source tree writes the
# same file as `bitbake -c update_crates petrestore`. Never edit it by hand.
# Its first assignment, SRC_URI += " \, is the class's own format (oe-core's
# generated crates files have it too). oelint-adv reports it as
# oelint.vars.inconspaces and oelint.vars.notneededspace; a suppression
# comment cannot go into a generated file, so the lint command in README.md
# filters out exactly those two findings on that line.
require petrestore-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# ---- Build ----
# Cargo.toml at the top of the source tree is the workspace; the default
# CARGO_SRC_DIR ("") makes it the manifest (--manifest-path) and Cargo.lock
# next to it the lock. Build the appliance package only, without its default
# "demo" feature (that one pulls the simulator into the binary).
# CARGO_BUILD_FLAGS is assigned by the cargo class, hence :append.
CARGO_BUILD_FLAGS:append = " -p petrestore --no-default-features"

# ---- Install ----
# Replaces cargo_do_install, which installs the executables it finds in the
# target folder (and, on scarthgap, the package's libpetrestore.rlib into
# ${rustlibdir}) but not the unit, the config or the model.
do_install () {
    install -D -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/petrestore ${D}${bindir}/petrestore

    install -D -m 0644 ${S}/systemd/petrestore.service ${D}${systemd_system_unitdir}/petrestore.service
    # The account and the state folder for systemd-sysusers/-tmpfiles (the
    # useradd class below creates them at build time as well).
    install -D -m 0644 ${S}/systemd/petrestore.sysusers ${D}${nonarch_libdir}/sysusers.d/petrestore.conf
    install -D -m 0644 ${S}/systemd/petrestore.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/petrestore.conf

    # Owned by root, readable by the service's group only: it holds AE titles
    # and peer addresses of the clinical network.
    install -d -m 0755 ${D}${sysconfdir}/petrestore
    install -m 0640 ${S}/config/petrestore.toml ${D}${sysconfdir}/petrestore/petrestore.toml
    chown root:petrestore ${D}${sysconfdir}/petrestore/petrestore.toml

    # The shipped model package only: models/test-unet (tests), models/tools
    # and models/train (training) stay out. Read-only; the service writes its
    # engine caches to /var/lib/petrestore.
    install -d -m 0755 ${D}${datadir}/petrestore/models
    cp -R --no-preserve=ownership ${S}/models/petrestore-unet25d ${D}${datadir}/petrestore/models/
    find ${D}${datadir}/petrestore/models -type d -exec chmod 0755 {} +
    find ${D}${datadir}/petrestore/models -type f -exec chmod 0644 {} +

    # The statically linked crates and their licences.
    install -D -m 0644 ${S}/THIRD-PARTY.md ${D}${docdir}/petrestore/THIRD-PARTY.md

    # Spool, journal and engine caches. The unit's StateDirectory= keeps the
    # same owner and mode at every start.
    install -d -m 0750 ${D}${localstatedir}/lib/petrestore
    chown petrestore:petrestore ${D}${localstatedir}/lib/petrestore
}

# Package managers keep local edits to the config across upgrades.
CONFFILES:${PN} = "${sysconfdir}/petrestore/petrestore.toml"

SYSTEMD_SERVICE:${PN} = "petrestore.service"
FILES:${PN} += "${nonarch_libdir}/sysusers.d ${nonarch_libdir}/tmpfiles.d"

# ---- Service account ----
# Static system user and group named in the unit (User=, Group=; no
# DynamicUser), home = state directory, no login shell; member of video and
# render for the GPU nodes, as systemd/petrestore.sysusers says, so that
# work run as this user outside the unit (runuser ... petrestore eval) also
# reaches the GPU where sysusers never runs. A group that exists already
# (udev's render) is kept as it is.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system petrestore; --system video; --system render"
USERADD_PARAM:${PN} = "--system --gid petrestore --groups video,render \
                       --home-dir ${localstatedir}/lib/petrestore --no-create-home \
                       --shell ${base_sbindir}/nologin petrestore"

# ---- Runtime ----
# ONNX Runtime is loaded at run time with dlopen() (the ort crate's
# load-dynamic feature), so nothing links against it and the shlib scanner
# does not see it. A recommendation, not a dependency: without the library
# the daemon uses its built-in tract engine. PETRESTORE_ORT_PACKAGE
# (conf/layer.conf) is "onnxruntime" when a layer in the build provides it and
# empty otherwise: bitbake fails on a recommendation nothing provides.
# Providers: a meta-onnxruntime layer (CPU only), or meta-tegra-community from
# whinlatter on (CUDA and TensorRT execution providers). Leave it out of an
# image with BAD_RECOMMENDATIONS += "onnxruntime".
RRECOMMENDS:${PN} += "${PETRESTORE_ORT_PACKAGE}"
