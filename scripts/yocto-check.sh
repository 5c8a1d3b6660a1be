#!/usr/bin/env bash
# What can be checked of the Yocto layer without a BSP: the locked-crates
# list in sync with Cargo.lock, and oelint-adv over the layer for every
# release it declares (any output is a finding). The one filtered finding is
# the generated crates file's own `SRC_URI += " \` line (see the layer's
# README). OELINT names the oelint-adv binary (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/yocto-crates.py --check
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
