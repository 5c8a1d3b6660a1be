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
# ORT_DYLIB_PATH for the ort engine; BEFORE_BIN: another build's
# petrestore binary, run with HEAD_PACKAGE and --uncertainty in the same
# rotation (a before/after column).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench-sigma.sh R_ONLY_PACKAGE [HEAD_PACKAGE]}
head=${2:-models/petrestore-unet25d}
reps=${REPS:-4} slices=${SLICES:-48} matrix=${MATRIX:-192} engines=${ENGINES:-ort tract}
cargo build --release -q -p petrestore -p petlab
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/release/petlab simulate --out "$work/in" --slices "$slices" --matrix "$matrix" > /dev/null
before=${BEFORE_BIN:-}
run() { # binary engine package extra-args… → seconds
  local bin=$1 e=$2 p=$3; shift 3
  rm -rf "$work/out"
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" restore --input "$work/in" --output "$work/out" --engine "$e" --model "$p" "$@" > /dev/null 2>&1
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }' 
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
now=target/release/petrestore
if [ -n "$before" ]; then
  echo "| engine | R alone ($base), s | R + σ, $before, s | R + σ ($head), s | before ÷ R | R + σ ÷ R |"
  echo "|---|---|---|---|---|---|"
else
  echo "| engine | R alone ($base), s | R + σ ($head), s | R + σ ÷ R |"
  echo "|---|---|---|---|"
fi
fmt() { printf '%s → **%.2f**' "$(printf '%.2f ' "$@")" "$(printf '%s\n' "$@" | median)"; }
ratio() { awk -v a="$(printf '%s\n' "${@:2}" | median)" -v b="$1" 'BEGIN { printf "%.3f", b / a }'; }
for e in $engines; do
  r=() s=() b=()
  for _ in $(seq "$reps"); do
    r+=("$(run "$now" "$e" "$base")")
    [ -n "$before" ] && b+=("$(run "$before" "$e" "$head" --uncertainty)")
    s+=("$(run "$now" "$e" "$head" --uncertainty)")
  done
  ms=$(printf '%s\n' "${s[@]}" | median)
  if [ -n "$before" ]; then
    mb=$(printf '%s\n' "${b[@]}" | median)
    echo "| $e | $(fmt "${r[@]}") | $(fmt "${b[@]}") | $(fmt "${s[@]}") | **$(ratio "$mb" "${r[@]}")** | **$(ratio "$ms" "${r[@]}")** |"
  else
    echo "| $e | $(fmt "${r[@]}") | $(fmt "${s[@]}") | **$(ratio "$ms" "${r[@]}")** |"
  fi
done
