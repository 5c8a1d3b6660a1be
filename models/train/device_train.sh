#!/bin/bash
# One training run on a lent GPU machine, in a single call of the device tool
# (15 minutes of device time per session, 10 per command: see README.md
# "Training on a lent GPU"). From the repository root here:
#
#   cargo build --release        # the simulator travels as this x86-64 binary
#   device run: command "bash models/train/device_train.sh", carry ["target/release/petlab"], timeout_s 590
#
# There it simulates the studies with all cores (nothing can be downloaded
# there and 1 GB of studies cannot travel), trains with the machine's own JAX
# on the GPU, fine-tunes for lesions, and leaves under $OUT: run/params.npz
# (best validation loss), run/train_log.json or run/checkpoint.json (history),
# ft/params.npz (the fine-tuned candidate) and log.txt. Export and judge the
# candidate here, on the validation split, against a rule written first.
# Each phase has a time cap so that the best weights so far always come back.
set -uo pipefail
: "${OUT:?OUT is set by the device tool: the folder whose files come back}"
B=${B:-target/release/petlab}
PY=${PY:-python3}
DATA=${DATA:-/tmp/petdata}
STUDIES=${STUDIES:-128}    # training studies (seeds 0..STUDIES-1 of the train split)
SIMS=${SIMS:-4}            # simulator processes side by side (each uses every core for its slices)
VAL=${VAL:-8}              # validation studies (the split the shipped model was judged on has 8)
SIM_ARGS=${SIM_ARGS:-}     # e.g. "--slices 8 --matrix 64" for a dry run on a small machine
WIDTH=${WIDTH:-24}
STEPS=${STEPS:-auto}       # cosine schedule length of the main run (1.0.0 settings otherwise); auto: what fits TRAIN_S
EVAL_EVERY=${EVAL_EVERY:-1000}
TOTAL_S=${TOTAL_S:-570}    # the whole script, inside the tool's 600 s per command
TRAIN_S=${TRAIN_S:-}       # wall-time cap of the main run; default: what is left after the simulation, the probe and the fine-tune
PROBE=${PROBE:-600}        # probe steps that time the GPU when STEPS=auto
PROBE_S=${PROBE_S:-60}     # wall-time cap of the probe
MIN_STEPS=${MIN_STEPS:-2000}
MAX_STEPS=${MAX_STEPS:-200000}
FT_STEPS=${FT_STEPS:-2500} # lesion fine-tune (the 1.1.0 settings) from the main run's best weights
FT_S=${FT_S:-50}
exec > >(tee "$OUT/log.txt") 2>&1
say() { echo "[$(date +%T)] $*"; }

[ -x "$B" ] || { echo "no simulator at $B: run cargo build --release -p petlab here and carry target/release/petlab"; exit 2; }
say "$(nproc) cores; $(nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: none')"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
$PY -c 'import jax, optax, numpy; print("jax", jax.__version__, "optax", optax.__version__, "numpy", numpy.__version__, jax.devices())' || exit 3

per=$(( (STUDIES + SIMS - 1) / SIMS ))
pids=()
"$B" dataset --out "$DATA/val" --split val --count "$VAL" $SIM_ARGS > /dev/null & pids+=($!)
for ((j = 0; j < SIMS; j++)); do
    n=$(( STUDIES - j * per < per ? STUDIES - j * per : per ))
    [ "$n" -gt 0 ] && { "$B" dataset --out "$DATA/train" --split train --count "$n" --skip $(( j * per )) $SIM_ARGS & pids+=($!); }
done
for p in "${pids[@]}"; do wait "$p" || { say "the simulator failed"; exit 4; }; done
say "simulated $(ls "$DATA"/train/*.npy | wc -l) training and $(ls "$DATA"/val/*.npy | wc -l) validation studies"
probe_s=0; [ "$STEPS" = auto ] && probe_s=$PROBE_S
TRAIN_S=${TRAIN_S:-$(( TOTAL_S - SECONDS - probe_s - FT_S - 15 ))}
[ "$TRAIN_S" -ge 60 ] || { say "only ${TRAIN_S} s left for training: make fewer STUDIES or give TOTAL_S"; exit 7; }

cd models/train
if [ "$STEPS" = auto ]; then
    # a short probe on the same data measures steps per second after the compile; the main
    # run's schedule is then as long as fits in TRAIN_S (a run cut early ends at a high learning rate)
    timeout "$probe_s" $PY -m petrain.train --train "$DATA/train" --val "$DATA/val" --out "$DATA/probe" \
        --width "$WIDTH" --steps 100000 --eval-every $(( PROBE / 3 )) --stop-after "$PROBE" > "$DATA/probe.log" 2>&1
    STEPS=$($PY -m petrain.schedule "$DATA/probe/checkpoint.json" --seconds "$TRAIN_S" \
        --min "$MIN_STEPS" --max "$MAX_STEPS" --factor 0.85 --round 1000) || { say "the probe failed:"; tail -20 "$DATA/probe.log"; exit 6; }
    say "probe: $(grep -c '^step=' "$DATA/probe.log") validations; main run schedule $STEPS steps"
fi
timeout "$TRAIN_S" $PY -m petrain.train --train "$DATA/train" --val "$DATA/val" --out "$OUT/run" \
    --width "$WIDTH" --steps "$STEPS" --eval-every "$EVAL_EVERY"
rc=$?
[ $rc -eq 124 ] && say "main run cut at ${TRAIN_S} s: its history is in run/checkpoint.json, its best weights in run/params.npz"
[ -f "$OUT/run/params.npz" ] || { say "main run left no weights (rc $rc)"; exit 5; }
timeout "$FT_S" $PY -m petrain.train --train "$DATA/train" --val "$DATA/val" --out "$OUT/ft" \
    --width "$WIDTH" --init "$OUT/run/params.npz" --lr 5e-4 --warmup 100 --lesion-weight 12 --lesion-fraction 0.7 \
    --steps "$FT_STEPS" --eval-every 250
say "fine-tune rc $?"
rm -f "$OUT"/ft/checkpoint.* "$OUT"/run/*.tmp.*   # at most 8 files come back
say done
