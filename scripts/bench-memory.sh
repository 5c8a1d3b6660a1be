#!/bin/bash
# What a restoration holds in memory: peak RSS of the whole `petrestore
# restore --uncertainty` (process, model, DICOM in and out, R and σ) for
# two series of the same matrix and different slice counts, per engine,
# and the bytes per voxel between them (the slope that
# `restore.max_voxels` is sized by). Prints a table. Needs GNU time
# (/usr/bin/time) and, for the ort engine, ORT_DYLIB_PATH or .venv's
# ONNX Runtime.
#
#   bash scripts/bench-memory.sh
#
# Environment: MATRIX (160, over 640 mm: 4 mm pixels), SLICES ("40 200"),
# ENGINES ("tract ort"), MODEL (the shipped package).
set -euo pipefail
cd "$(dirname "$0")/.."
matrix=${MATRIX:-160} engines=${ENGINES:-tract ort} model=${MODEL:-models/petrestore-unet25d}
read -r small large <<< "${SLICES:-40 200}"
[ -x /usr/bin/time ] || { echo "bench-memory.sh: needs GNU time at /usr/bin/time (Debian: apt install time)" >&2; exit 1; }
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -1 || true)
  [ -n "$lib" ] && export ORT_DYLIB_PATH=$PWD/$lib
fi
cargo build --release -q -p petrestore -p petlab
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fov=$(( matrix * 4 ))
for n in $small $large; do
  target/release/petlab simulate --out "$work/in$n" --slices "$n" --matrix "$matrix" --fov-mm "$fov" > /dev/null
done
peak() { # engine slices → peak RSS in KiB
  rm -rf "$work/out"
  /usr/bin/time -f "%M" -o "$work/rss" target/release/petrestore restore --uncertainty --input "$work/in$2" \
    --output "$work/out" --engine "$1" --model "$model" > /dev/null 2>&1
  cat "$work/rss"
}
echo "| engine | ${matrix}² × $small slices, MiB | ${matrix}² × $large slices, MiB | bytes per voxel between them |"
echo "|---|---|---|---|"
for e in $engines; do
  a=$(peak "$e" "$small") b=$(peak "$e" "$large")
  awk -v e="$e" -v a="$a" -v b="$b" -v v=$(( matrix * matrix * (large - small) )) \
    'BEGIN { printf "| %s | %.0f | %.0f | %.1f |\n", e, a / 1024, b / 1024, (b - a) * 1024 / v }'
done
