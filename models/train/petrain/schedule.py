"""How long a cosine schedule fits in the time left, from a short probe run.

The GPU scripts (device_train.sh, device_robust.sh) first train a few hundred
steps with --stop-after, then size the main run's schedule so that it ends
inside the command's time limit (a run cut early ends at a high learning
rate). This reads the probe's checkpoint.json and prints the step count:

    python -m petrain.schedule PROBE/checkpoint.json --seconds 300 --min 1000 --max 100000

The rate is measured between the probe's first and last validations (after
the compile); the main run's own start-up (loading, compiles) is either
measured from the probe (the time of its first validation less its steps at
that rate, plus 15 s) or given with --startup. A probe cut before its first
validation (no checkpoint, or no entry) gives --min.
"""

import argparse
import json


def steps_that_fit(history, seconds, lo, hi, factor=0.85, round_to=1000, startup=None):
    """Schedule length for `seconds` of training given a probe's validation history.

    history: the probe's entries ({"step", "minutes"}); the entry of the starting
    weights (step 0, written with --init) is not a timing and is left out.
    startup: seconds the main run spends before its first step; None measures it.
    """
    h = [e for e in history if e["step"] > 0]
    if len(h) >= 2:
        rate = (h[-1]["step"] - h[0]["step"]) / max((h[-1]["minutes"] - h[0]["minutes"]) * 60, 1e-6)
    elif h:
        rate = h[0]["step"] / max(h[0]["minutes"] * 60, 1e-6)  # compile included: slower than it is
    else:
        return lo
    if startup is None:
        startup = max(h[0]["minutes"] * 60 - h[0]["step"] / rate, 0.0) + 15
    steps = int(rate * (seconds - startup) * factor) // round_to * round_to
    return min(max(steps, lo), hi)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="the probe run's checkpoint.json (petrain.train --stop-after)")
    ap.add_argument("--seconds", type=float, required=True, help="wall time the main run may take")
    ap.add_argument("--min", type=int, default=1000, help="shortest schedule (also when the probe left no timing)")
    ap.add_argument("--max", type=int, default=100000)
    ap.add_argument("--factor", type=float, default=0.85, help="share of the measured rate counted on")
    ap.add_argument("--round", type=int, default=1000, help="schedule rounded down to a multiple of this")
    ap.add_argument("--startup", type=float, help="the main run's start-up in seconds (default: measured from the probe)")
    a = ap.parse_args(argv)
    try:
        history = json.load(open(a.checkpoint))["history"]
    except OSError:
        history = []  # the probe was cut before its first validation
    print(steps_that_fit(history, a.seconds, a.min, a.max, a.factor, a.round, a.startup))


if __name__ == "__main__":
    main()
