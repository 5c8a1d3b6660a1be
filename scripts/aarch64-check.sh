#!/usr/bin/env bash
# The box's binary: cross-build the appliance for aarch64 (Jetson) and run it
# under qemu-user: --version, check-config of the shipped config, and an
# offline restore of a small simulated series with the shipped model on the
# tract engine, compared with the x86_64 build's output (same derived UIDs,
# pixels within the engines' parity tolerance). Prints the binary's size and
# the emulated restore time.
#
# Needs: rustup target aarch64-unknown-linux-gnu, Debian's
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user-static, the
# x86_64 release build of the workspace (target/release/petrestore, petlab)
# and .venv with pydicom and numpy (as .ci/run makes them).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --locked --target "$target" -p petrestore --no-default-features
bin=target/$target/release/petrestore
file "$bin" | grep -q "ARM aarch64" || { echo "aarch64-check: $bin is not an aarch64 binary"; file "$bin"; exit 1; }
size_mb=$(du -m "$bin" | cut -f1)

run() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" "$@"; }
run --version
run check-config config/petrestore.toml
# the appliance build carries no simulator: no demo command
if run demo --help >/dev/null 2>&1; then echo "aarch64-check: the appliance binary must not carry the demo (simulator)"; exit 1; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# 4 mm pixels: inside the pixel sizes the shipped model restores (2.0-5.3 mm)
target/release/petlab simulate --physics --out "$work/study" --slices 8 --matrix 64 --fov-mm 256 --seed 11 > /dev/null
model=models/petrestore-unet25d
target/release/petrestore restore --input "$work/study/PT30" --output "$work/x86_64" --engine tract --model "$model" > /dev/null
t0=$(date +%s.%N)
RUST_LOG=warn run restore --input "$work/study/PT30" --output "$work/aarch64" --engine tract --model "$model" > /dev/null
t1=$(date +%s.%N)
.venv/bin/python - "$work/x86_64" "$work/aarch64" <<'EOF'
import pathlib, sys
import numpy as np
import pydicom

def series(folder):
    out = {}
    for p in pathlib.Path(folder).rglob("*"):
        if p.is_file():
            d = pydicom.dcmread(p)
            out[d.SOPInstanceUID] = (d.SeriesInstanceUID, d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept))
    return out

a, b = series(sys.argv[1]), series(sys.argv[2])
if set(a) != set(b):
    sys.exit(f"aarch64-check: derived SOP Instance UIDs differ ({len(set(a) ^ set(b))} of {len(a)})")
if {v[0] for v in a.values()} != {v[0] for v in b.values()}:
    sys.exit("aarch64-check: derived Series Instance UIDs differ")
span = max(float(v[1].max()) for v in a.values()) - min(float(v[1].min()) for v in a.values())
worst = max(float(np.abs(a[k][1] - b[k][1]).max()) for k in a)
# the engines' parity tolerance (tests/engines.rs): 1e-4 of the range, plus
# one step of the 16-bit output quantisation
step = span / 32766
if worst > 1e-4 * span + step:
    sys.exit(f"aarch64-check: pixels differ by {worst:.3g} Bq/ml (range {span:.3g})")
print(f"aarch64 vs x86_64: {len(a)} instances, same UIDs, max pixel difference {worst:.3g} Bq/ml of a {span:.3g} range")
EOF
printf 'aarch64 binary: %s MB (%s); emulated restore of 8 x 64² slices with %s on tract: %.1f s\n' \
  "$size_mb" "$bin" "$model" "$(echo "$t1 - $t0" | bc)"
