#!/bin/bash
# The across-reconstruction fine-tune (the 2.x recipe of README.md) on a GPU
# machine lent for one command of at most 10 minutes. From the repository
# root here: `cargo build --release` (the simulator travels as this x86-64
# binary), then run `bash models/train/device_robust.sh` there from a copy
# of the repository with target/release/petlab, OUT naming the folder whose
# files come back.
#
# There, with all cores for SIM_S seconds, it simulates randomized training
# studies (one clinical reconstruction drawn per study, seeds of the train
# split that no shipped model has seen), ellipse reference studies (the 1.x
# reconstruction) and one validation study per site-matrix cell. Meanwhile
# it rebuilds the shipped package's weights (petrain.from_onnx, which checks
# them against the package). A short probe times the GPU; the fine-tune then
# runs the 2.0.0 settings (texture inputs, lesion weight 12, 70 % lesion
# patches, lr 5e-4 unless LR says otherwise) on a cosine schedule as long
# as fits in what is left of TOTAL_S (or STEPS steps, without the probe),
# keeping the weights with the best validation seed MSE metric (LOWFREQ > 0
# adds petrain.train's --lowfreq-weight: the error after a Gaussian of
# LOWFREQ_FWHM pixels counted again).
# Then it trains the fine-tuned network's own σ head (SIG_STEPS steps
# within the last SIG_S seconds; with SOUP=1 for the mean of the starting
# weights and the fine-tune, soup/params.npz). Back under $OUT: run/params.npz,
# run/train_log.json (or checkpoint.json when the run was cut),
# sig/sigma_params.npz and sig/coverage.json, sim.txt (what was simulated,
# and how fast) and log.txt. Two commands on one machine give each phase
# more time (the machine keeps /tmp between commands that follow at once):
# ONLY_SIM=1 with a longer SIM_S, then SIM_S=1 (studies already there are
# kept). Export and judge the candidate here, on both validation grids,
# against a rule written before the call.
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
B=${B:-target/release/petlab}
PY=${PY:-python3}
DATA=${DATA:-/tmp/petdata}
PKG=${PKG:-models/petrestore-unet25d}   # the package whose weights the fine-tune starts from
TOTAL_S=${TOTAL_S:-575}   # the whole script, inside the tool's 600 s per command
SIM_S=${SIM_S:-250}       # wall time of the randomized simulation
SIMS=${SIMS:-2}           # randomized simulator processes side by side
PER=${PER:-60}            # seeds reserved per process (more than fit in SIM_S)
SEED0=${SEED0:-3000}      # first randomized seed (2.0.0 trained on 1000–1111)
REF=${REF:-16}            # ellipse reference studies, seeds 2000…
REF_ARGS=${REF_ARGS:-}    # e.g. "--matrix 64" for a dry run
VALCOUNT=${VALCOUNT:-1}   # validation studies per site-matrix cell
SITES=${SITES:-all}       # the validation cells (one cell's name for a dry run)
SLICES=${SLICES:-8}
WIDTH=${WIDTH:-24}
BATCH=${BATCH:-32}
STEPS=${STEPS:-auto}      # cosine schedule length; auto: what fits
LR=${LR:-5e-4}            # peak learning rate of the fine-tune (2.0.0's)
WARMUP=${WARMUP:-100}     # its linear warm-up, steps
LOWFREQ=${LOWFREQ:-0}     # weight of the error after a Gaussian of LOWFREQ_FWHM pixels, counted again (0: off)
LOWFREQ_FWHM=${LOWFREQ_FWHM:-4}
EVAL_EVERY=${EVAL_EVERY:-1000}
PROBE=${PROBE:-300}
PROBE_S=${PROBE_S:-75}
MIN_STEPS=${MIN_STEPS:-1000}
MAX_STEPS=${MAX_STEPS:-100000}
SIG_STEPS=${SIG_STEPS:-4000} # σ head trained for the fine-tuned network (0: none)
SIG_S=${SIG_S:-150}       # seconds kept for it at the end
SOUP=${SOUP:-0}           # 1: also average the fine-tune with the starting weights
                          # (petrain.soup; back as soup/params.npz) and train the σ head for that
MIN_RAND=${MIN_RAND:-4}   # fewer randomized studies than this: stop (0 for a dry run)
shopt -s nullglob
exec > >(tee "$OUT/log.txt") 2>&1
say() { echo "[$(date +%T) +${SECONDS}s] $*"; }

[ -x "$B" ] || { echo "no simulator at $B: run cargo build --release here and carry target/release/petlab"; exit 2; }
say "$(nproc) cores; $(nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: none')"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# full float32 in convolutions: petrain.from_onnx checks the rebuilt weights
# against the package to 1e-4, which the GPU's default TF32 misses (0.0036 on
# the variance output)
export JAX_DEFAULT_MATMUL_PRECISION=${JAX_DEFAULT_MATMUL_PRECISION:-highest}
$PY -c 'import jax, optax, numpy, onnx, onnxruntime; print("jax", jax.__version__, "optax", optax.__version__, "numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__, jax.devices())' || exit 3
mkdir -p "$DATA"/rtrain "$DATA"/ref "$DATA"/val "$DATA"/valflat "$DATA"/val1 "$DATA"/mix "$DATA"/init

# the shipped weights, checked against the package, while the simulator runs
root=$PWD
export PYTHONPATH=$root/models/train
(cd models/train && $PY -m petrain.from_onnx --package "$root/$PKG" --out "$DATA/init/params.npz") > "$DATA/from_onnx.log" 2>&1 &
init_pid=$!

t0=$SECONDS
pids=()
vdir=$DATA/val; [ "$SITES" = all ] || vdir=$DATA/val/$SITES
"$B" dataset --out "$vdir" --site "$SITES" --split val --count "$VALCOUNT" --slices "$SLICES" > "$DATA/sim-val.txt" & pids+=($!)
"$B" dataset --out "$DATA/ref" --split train --count "$REF" --skip 2000 --slices "$SLICES" $REF_ARGS > "$DATA/sim-ref.txt" & pids+=($!)
rpids=()
for ((j = 0; j < SIMS; j++)); do
    timeout "$SIM_S" "$B" dataset --out "$DATA/rtrain" --split train --randomize --count "$PER" \
        --skip $(( SEED0 + j * PER )) --slices "$SLICES" > /dev/null 2>&1 & rpids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { say "the simulator failed"; cat "$DATA"/sim-*.txt; exit 4; }; done
say "validation and reference studies done in $(( SECONDS - t0 )) s"
for p in "${rpids[@]}"; do wait "$p"; done
# a study cut by the timeout may be half written: keep only complete pairs
$PY - "$DATA/rtrain" <<'PY'
import glob, json, os, sys
import numpy as np
bad = 0
for npy in sorted(glob.glob(os.path.join(sys.argv[1], "*.npy"))):
    js = npy[:-4] + ".json"
    try:
        a = np.load(npy, mmap_mode="r")
        json.load(open(js))
        assert a.ndim == 4 and a.shape[0] == 5 and os.path.getsize(npy) >= a.size * 4
    except Exception:
        bad += 1
        for f in (npy, js):
            if os.path.exists(f):
                os.remove(f)
print(f"removed {bad} studies cut by the time limit")
PY
studies=("$DATA"/rtrain/*.npy)
nr=${#studies[@]}
{
    echo "randomized studies: $nr in ${SIM_S} s with $SIMS processes on $(nproc) cores (seeds from $SEED0, $PER per process)"
    cat "$DATA/sim-ref.txt" "$DATA/sim-val.txt"
    $PY - "$DATA/rtrain" <<'PY'
import glob, json, os, sys
from collections import Counter
c = Counter()
for js in glob.glob(os.path.join(sys.argv[1], "*.json")):
    m = json.load(open(js))
    c[m.get("matrix") or m.get("geometry", {}).get("matrix")] += 1
print("randomized matrices:", dict(sorted(c.items(), key=lambda kv: str(kv[0]))))
PY
} | tee "$OUT/sim.txt"
[ "$nr" -ge "$MIN_RAND" ] || { say "too few randomized studies ($nr): give SIM_S or SIMS"; exit 4; }
[ "${ONLY_SIM:-0}" = 1 ] && { say "simulation only (ONLY_SIM=1): studies kept in $DATA for the next command"; exit 0; }
ln -sf "$DATA"/rtrain/* "$DATA"/ref/* "$DATA"/mix/
ln -sf "$DATA"/val/*/* "$DATA"/valflat/
ln -sf "$DATA"/val/c1-ref128/* "$DATA"/val1/

wait "$init_pid" || { say "from_onnx failed:"; tail -30 "$DATA/from_onnx.log"; exit 5; }
tail -3 "$DATA/from_onnx.log"
say "weights rebuilt"

cd models/train
common=(--train "$DATA/mix" --width "$WIDTH" --batch "$BATCH" --init "$DATA/init/params.npz" --texture
        --lr "$LR" --warmup "$WARMUP" --lesion-weight 12 --lesion-fraction 0.7 --seed 1
        --lowfreq-weight "$LOWFREQ" --lowfreq-fwhm "$LOWFREQ_FWHM")
if [ "$STEPS" = auto ]; then
    # the probe times steps per second after the compile (on a one-study validation
    # set, so that it compiles little); the main run's cosine schedule is then as
    # long as fits in what is left
    timeout "$PROBE_S" $PY -m petrain.train "${common[@]}" --val "$DATA/val1" --out "$DATA/probe" \
        --steps 100000 --eval-every $(( PROBE / 3 )) --stop-after "$PROBE" > "$DATA/probe.log" 2>&1
    left=$(( TOTAL_S - SECONDS - 10 - (SIG_STEPS > 0 ? SIG_S : 0) ))
    # loading, compiles and the validations of the full run: a fixed 60 s, with margin
    STEPS=$($PY -m petrain.schedule "$DATA/probe/checkpoint.json" --seconds "$left" \
        --min "$MIN_STEPS" --max "$MAX_STEPS" --factor 0.8 --round 500 --startup 60) || { say "the probe failed:"; tail -30 "$DATA/probe.log"; exit 6; }
    say "probe: $(grep '^step=' "$DATA/probe.log" | tail -1 | cut -c1-160)"; tail -3 "$DATA/probe.log"
    say "main run schedule $STEPS steps"
    EVAL_EVERY=$(( STEPS / 8 > 250 ? STEPS / 8 / 250 * 250 : 250 ))
fi
left=$(( TOTAL_S - SECONDS - 5 - (SIG_STEPS > 0 ? SIG_S : 0) ))
timeout "$left" $PY -m petrain.train "${common[@]}" --val "$DATA/valflat" --out "$OUT/run" \
    --select seed_mse --steps "$STEPS" --eval-every "$EVAL_EVERY"
rc=$?
[ $rc -eq 124 ] && say "main run cut at the time limit: history in run/checkpoint.json, best weights in run/params.npz"
[ -f "$OUT/run/params.npz" ] || { say "main run left no weights (rc $rc)"; exit 7; }
net=$OUT/run/params.npz
if [ "$SOUP" = 1 ]; then
    # half way between the starting weights and the fine-tune: both are one network
    # fine-tuned from one point, so their mean is one too (EVAL.md "Weight averages")
    $PY -m petrain.soup --out "$OUT/soup/params.npz" "$DATA/init/params.npz" "$OUT/run/params.npz" || { say "soup failed"; exit 8; }
    net=$OUT/soup/params.npz
fi
if [ "$SIG_STEPS" -gt 0 ]; then
    # the σ head belongs to its network: the shipped head under-covers or over-covers
    # a network whose error changed, so the candidate's own head is trained here
    # (the network fixed; coverage on the validation cells printed at the end)
    timeout $(( TOTAL_S - SECONDS - 3 )) $PY -m petrain.sigma --params "$net" --train "$DATA/mix" \
        --grid "$DATA/val" --out "$OUT/sig" --steps "$SIG_STEPS"
    rc=$?
    say "σ head (for $(basename "$(dirname "$net")")/params.npz) rc $rc"
fi
rm -f "$OUT"/run/checkpoint.npz "$OUT"/run/*.tmp.*   # at most 8 files come back
[ -f "$OUT/run/train_log.json" ] && rm -f "$OUT/run/checkpoint.json"   # the finished run's history is in train_log.json
say done
