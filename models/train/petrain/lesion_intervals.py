"""Per-lesion SUVmean intervals of a σ, from `petlab eval --grid … --json`.

`petlab eval` writes, for every restored frame with a σ, each lesion's
|R̄ − PET̄90| ÷ σ̄ (VOI means over the lesion's sphere; `lesion_means` of the
record's `uncertainty`). The interval R̄ ± z·σ̄ treats the VOI's errors as
fully correlated. This pools the lesions ≥ 10 mm over the cells of a grid,
per frame duration, and prints their coverage and the factor on σ̄ that
would make them nominal (the 68.27 % quantile, and the 95 % quantile ÷ 1.96),
below and above 20 mm:

    python -m petrain.lesion_intervals REPORT.json [REPORT2.json …]

With --fit FIT.json it also fits, per frame duration on FIT.json's lesions,
σ of the VOI mean = σ̄ × √(min(1, V_d ÷ V) + b_d²) (V the sphere's volume;
V_d on a log grid 20–5,000 mm³, b_d in 0–1 by 0.01, the pair closest to
nominal at 68 and 95 %) and prints each report's coverage under it
(EVAL.md "Per-lesion SUVmean intervals").
"""

import argparse
import json
import math

import numpy as np

Z68, Z95 = 1.0, 1.96
MIN_MM = 10.0


def lesions(report):
    """(duration s, diameter mm, |R̄ − PET̄90| ÷ σ̄) of every lesion ≥ 10 mm of the model's records."""
    out = []
    for cell in report["cells"].values():
        for r in cell["records"]:
            if r.get("method") == "model" and r.get("uncertainty"):
                out += [(float(r["duration_s"]), d, z) for d, z in r["uncertainty"]["lesion_means"] if d >= MIN_MM]
    return out


def coverage(z):
    z = np.asarray(z, dtype=float)
    return 100 * float(np.mean(z <= Z68)), 100 * float(np.mean(z <= Z95))


def factors(z):
    """The factor on σ̄ that would make the intervals nominal at 68 % and at 95 %."""
    return float(np.quantile(z, 0.6827)) / Z68, float(np.quantile(z, 0.95)) / Z95


def scaled(ls, v, b):
    return [z / math.sqrt(min(1.0, v / (math.pi / 6 * d**3)) + b * b) for _, d, z in ls]


def fit(ls):
    """(V mm³, b) of the volume form closest to nominal coverage on lesions `ls`."""
    best = None
    for v in np.geomspace(20, 5000, 120):
        for b in np.round(np.arange(0, 1.0001, 0.01), 2):
            c68, c95 = coverage(scaled(ls, v, b))
            e = (c68 - 68.27) ** 2 + (c95 - 95) ** 2
            if best is None or e < best[0] - 1e-12:
                best = (e, float(v), float(b))
    return best[1], best[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="petlab eval --json reports of a model with a σ")
    ap.add_argument("--fit", help="fit the volume form per frame duration on this report's lesions")
    a = ap.parse_args(argv)
    forms = {}
    if a.fit:
        fl = lesions(json.load(open(a.fit)))
        for d in sorted({x[0] for x in fl}):
            forms[d] = fit([x for x in fl if x[0] == d])
            print(f"fitted on {a.fit}, {d:.0f} s: V = {forms[d][0]:.0f} mm³, b = {forms[d][1]:.2f}")
    print("| report | frame | lesions | coverage 68 / 95 % | factor 68 / 95 | factor 68 %, < 20 / ≥ 20 mm |"
          + (" volume form 68 / 95 % |" if forms else ""))
    print("|---|---|---|---|---|---|" + ("---|" if forms else ""))
    for path in a.reports:
        ls = lesions(json.load(open(path)))
        if not ls:
            raise SystemExit(f"{path}: no lesion intervals (a model without σ, or no lesions ≥ {MIN_MM:.0f} mm)")
        for d in sorted({x[0] for x in ls}):
            sel = [x for x in ls if x[0] == d]
            z = [x[2] for x in sel]
            small = [x[2] for x in sel if x[1] < 20]
            large = [x[2] for x in sel if x[1] >= 20]
            f68, f95 = factors(z)
            by_size = " / ".join(f"{factors(s)[0]:.2f}" if s else "—" for s in (small, large))
            row = f"| {path} | {d:.0f} s | {len(sel)} | {coverage(z)[0]:.1f} / {coverage(z)[1]:.1f} | {f68:.2f} / {f95:.2f} | {by_size} |"
            if forms:
                row += " {:.1f} / {:.1f} |".format(*coverage(scaled(sel, *forms[d]))) if d in forms else " — |"
            print(row)


if __name__ == "__main__":
    main()
