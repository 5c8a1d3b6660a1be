"""What a perfect denoiser would score: the reference for every goal.

    python -m petrain.oracle --dataset ../../data/val [--dataset ../../data/test]

The network's output is w·x + (1 − w)·den with w = frame duration / 90 s
(MODEL_CARD.md). With den equal to the noise-free reconstruction of the 90 s
data (the dataset's clean90 plane) this is the nested-frame conditional mean
of DESIGN.md "Quality", up to OSEM's nonlinearity: its seed MSE metric should
sit at the ceiling (66.7 % at 30 s, 33.3 % at 60 s). This prints that metric
and the lesion biases vs PET90 of the same "oracle" image, with the ROIs of
`petrestore eval` (petrain.evaluate mirrors them), so a lesion goal can be
read against what any restoration of the short frame can reach: a denoised
image cannot reproduce PET90's own noise at a lesion's hottest voxel.
Analysis only: it chooses nothing.
"""

import argparse
import json
import os

import numpy as np

from .evaluate import mse, sphere_voxels

PET90, CLEAN90 = 2, 3


def oracle_rows(dataset):
    """Per duration: the seed MSE metric of each study (as `petrestore eval`
    averages it) and,
    per lesion >= 10 mm, (SUVmax bias, SUVmean bias, raw short SUVmax bias, study, diameter)."""
    seed = {30: [], 60: []}
    lesions = {30: [], 60: []}
    for f in sorted(os.listdir(dataset)):
        if not f.endswith(".npy"):
            continue
        meta = json.load(open(os.path.join(dataset, f[:-4] + ".json")))
        if meta["source"] == "nema":
            continue
        a = np.load(os.path.join(dataset, f))
        p90, clean = a[PET90], a[CLEAN90]
        px, dz = meta["pixel_mm"], meta["slice_thickness_mm"]
        for d, plane in ((30, 0), (60, 1)):
            w = d / 90.0
            x = a[plane]
            o = w * x + (1 - w) * clean
            seed[d].append(100 * (1 - mse(o, p90) / mse(x, p90)))
            for l in meta["lesions"]:
                if l["diameter_mm"] < 10:
                    continue
                m = sphere_voxels(o.shape, (px, px, dz), (l["slice"], l["row"], l["col"]), l["diameter_mm"] / 2)
                lesions[d].append((
                    100 * (o[m].max() / p90[m].max() - 1),
                    100 * (o[m].mean() / p90[m].mean() - 1),
                    100 * (x[m].max() / p90[m].max() - 1),
                    f[:-4],
                    l["diameter_mm"],
                ))
    return seed, lesions


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", required=True, help="a directory of `petrestore dataset` studies (repeatable)")
    ap.add_argument("--worst", type=int, default=3, help="list this many worst lesions by SUVmax")
    a = ap.parse_args(argv)
    print("| dataset | duration | seed MSE metric | lesions ≥ 10 mm | SUVmax bias mean / worst | below −15 % | SUVmean bias mean / worst |")
    print("|---|---|---|---|---|---|---|")
    worst = []
    for ds in a.dataset:
        seed, lesions = oracle_rows(ds)
        for d in (30, 60):
            rows = sorted(lesions[d])
            if not rows:
                raise SystemExit(f"{ds}: no lesion of 10 mm or more (is it a `petrestore dataset` directory?)")
            mx = np.array([r[0] for r in rows])
            mn = np.array([r[1] for r in rows])
            metric = float(np.mean(seed[d]))
            print(f"| {os.path.basename(os.path.normpath(ds))} | {d} s | {metric:.1f} | {len(rows)} | "
                  f"{mx.mean():+.1f} / {mx.min():+.1f} | {int((mx < -15).sum())} | {mn.mean():+.1f} / {mn.min():+.1f} |")
            worst += [(ds, d, r) for r in rows[: a.worst]]
    print()
    for ds, d, r in worst:
        print(f"- {os.path.basename(os.path.normpath(ds))} {d} s, {r[3]} {r[4]:.1f} mm: oracle SUVmax {r[0]:+.1f} %, "
              f"SUVmean {r[1]:+.1f} %; raw short frame SUVmax {r[2]:+.1f} %")


if __name__ == "__main__":
    main()
