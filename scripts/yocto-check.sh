#!/usr/bin/env bash
# What can be checked of the Yocto layer without a BSP: the locked-crates
# list in sync with Cargo.lock, and oelint-adv over the layer for every
# release it declares (any output is a finding). The one filtered finding is
# the generated crates file's own `SRC_URI += " \` line (see the layer's
# README). OELINT names the oelint-adv binary (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/yocto-crates.py --check
# Every licence the recipe names needs its text in oe-core's common-licenses
# of every release the layer declares, or in the layer's own licenses/
# (create-spdx stops on a licence without a text). These are in
# common-licenses from scarthgap on; any other needs a file in licenses/.
in_oe_core="Apache-2.0 MIT ISC BSD-3-Clause CC0-1.0 Zlib"
recipe=yocto/meta-petrestore/recipes-medical/petrestore/petrestore_0.1.0.bb
for l in $(sed -n 's/^LICENSE = "\(.*\)"/\1/p' "$recipe" | tr '&|()' '    '); do
  case " $in_oe_core " in *" $l "*) continue ;; esac
  [ -s "yocto/meta-petrestore/licenses/$l" ] || { echo "yocto-check: the recipe names licence $l: add its text as yocto/meta-petrestore/licenses/$l"; exit 1; }
done
grep -q '^LICENSE_PATH += "${LAYERDIR}/licenses"' yocto/meta-petrestore/conf/layer.conf \
  || { echo "yocto-check: conf/layer.conf must add \${LAYERDIR}/licenses to LICENSE_PATH"; exit 1; }
oelint=${OELINT:-.venv/bin/oelint-adv}
[ -x "$oelint" ] || { echo "yocto-check: $oelint not found: .venv/bin/pip install oelint-adv==9.11.2 (as .ci/run does)"; exit 2; }
files=$(find yocto/meta-petrestore -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' | sort)
findings=""
for r in scarthgap styhead walnascar; do
  # shellcheck disable=SC2086
  out=$("$oelint" --quiet --relpaths --mode all --release $r $files 2>&1 \
    | grep -v '^yocto/meta-petrestore/recipes-medical/petrestore/petrestore-crates.inc:4:[a-z]*:oelint\.vars\.\(inconspaces\|notneededspace\):' || true)
  [ -z "$out" ] || findings+="release $r:"$'\n'"$out"$'\n'
done
if [ -n "$findings" ]; then echo "oelint-adv findings:"; echo "$findings"; exit 1; fi
echo "yocto layer: crates in sync, oelint-adv clean for scarthgap, styhead, walnascar"
