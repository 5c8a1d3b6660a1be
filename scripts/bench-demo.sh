#!/usr/bin/env bash
# How long `petrestore demo` takes, step by step: runs it N times (default
# 3) on the release build and prints the median of each step's time.
#   bash scripts/bench-demo.sh [N] [-- demo options, e.g. --engine tract]
set -euo pipefail
cd "$(dirname "$0")/.."
n=3
if [[ $# -gt 0 && $1 != -- ]]; then n=$1; shift; fi
[[ ${1:-} == -- ]] && shift
bin=${PETRESTORE:-target/release/petrestore}
[[ -x $bin ]] || { echo "no $bin: build it first (cargo build --release)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$n"); do
    "$bin" demo --workdir "$tmp/run" "$@" > "$tmp/out$i.txt" 2> "$tmp/err$i.txt" || { cat "$tmp/err$i.txt" >&2; exit 1; }
done
python3 - "$tmp" "$n" "$(nproc)" "$*" <<'PY'
import re, statistics, sys
tmp, n, cores, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
names = {1: "simulate (30 s + 90 s frames, OSEM)", 2: "start the daemon", 3: "send (C-STORE)", 4: "restore + deliver (model load included)"}
steps, total, engine = {k: [] for k in names}, [], "?"
for i in range(1, n + 1):
    text = open(f"{tmp}/out{i}.txt").read()
    for m in re.finditer(r"^  (\d)\. (.*) \(([\d.]+) s\)$", text, re.M):
        steps[int(m.group(1))].append(float(m.group(3)))
        if m.group(1) == "4":
            engine = m.group(2).split()[2]
    total += [float(x) for x in re.findall(r"^  ([\d.]+) s in all", text, re.M)]
print(f"petrestore demo, {n} runs, {cores} cores, engine {engine}{', options ' + opts if opts else ''}")
print(f"{'step':<42} {'median s':>9} {'min s':>7} {'max s':>7}")
for k, name in names.items():
    v = steps[k]
    print(f"{name:<42} {statistics.median(v):>9.1f} {min(v):>7.1f} {max(v):>7.1f}")
print(f"{'whole demo (incl. measuring and drawing)':<42} {statistics.median(total):>9.1f} {min(total):>7.1f} {max(total):>7.1f}")
PY
