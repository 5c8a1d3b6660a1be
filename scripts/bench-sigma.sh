#!/bin/bash
# What the σ series costs: the whole `petrestore restore` (process start,
# model load, DICOM in and out) of one simulated series, R alone against
# R + σ, the two alternating within each repetition; prints every run and
# the medians as a table. Run it with nothing else on the machine.
#
#   bash scripts/bench-sigma.sh R_ONLY_PACKAGE [HEAD_PACKAGE]
#
# R_ONLY_PACKAGE: a package with the same restoration network and no σ
# head (for the shipped one: `python -m petrain.from_onnx` of it, then
# `python -m petrain.export` without --sigma-head, see
# models/train/README.md). HEAD_PACKAGE: default the shipped package.
# Environment: REPS (4), SLICES (48), MATRIX (192), ENGINES ("ort tract"),
# ORT_DYLIB_PATH for the ort engine.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench-sigma.sh R_ONLY_PACKAGE [HEAD_PACKAGE]}
head=${2:-models/petrestore-unet25d}
reps=${REPS:-4} slices=${SLICES:-48} matrix=${MATRIX:-192} engines=${ENGINES:-ort tract}
cargo build --release -q -p petrestore -p petlab
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/petlab simulate --out "$work/in" --slices "$slices" --matrix "$matrix" > /dev/null
run() { # engine package extra-args… → seconds
  local e=$1 p=$2; shift 2
  rm -rf "$work/out"
  local t0 t1
  t0=$(date +%s.%N)
  target/release/petrestore restore --input "$work/in" --output "$work/out" --engine "$e" --model "$p" "$@" > /dev/null 2>&1
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }' 
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "| engine | R alone ($base), s | R + σ ($head), s | R + σ ÷ R |"
echo "|---|---|---|---|"
for e in $engines; do
  r=() s=()
  for _ in $(seq "$reps"); do
    r+=("$(run "$e" "$base")")
    s+=("$(run "$e" "$head" --uncertainty)")
  done
  mr=$(printf '%s\n' "${r[@]}" | median) ms=$(printf '%s\n' "${s[@]}" | median)
  printf '| %s | %s → **%.2f** | %s → **%.2f** | **%.3f** |\n' "$e" "$(printf '%.2f ' "${r[@]}")" "$mr" \
    "$(printf '%.2f ' "${s[@]}")" "$ms" "$(awk -v a="$mr" -v b="$ms" 'BEGIN { print b / a }')"
done
