"""How a frame's noise grows with the local level, per cell of a grid.

The lesion guard (docs/QUALITY.md "The lesion guard") compares the
network's smoothed change with the frame's noise at the same scale, and its
`power` says how that noise grows with the local level: SD ∝ level^power.
This measures the power on simulated studies, where the noise is known: the
short frame minus the noise-free reconstruction (`clean90`), both smoothed
with a 3D Gaussian of the guard's FWHM, over the body (voxels of the
smoothed noise-free image above 5 % of its 99.9th percentile), in ten bins
of equal voxel count by the smoothed noise-free level; the power is the
slope of log SD against log mean level over the bins, averaged over the
cell's studies.

    python -m petrain.noise_power --grid GRID [--fwhm 5 15] [--duration 30]

Prints one row per cell and the median over cells for each FWHM.
"""

import argparse
import glob
import json
import os

import numpy as np
from scipy.ndimage import gaussian_filter

from .data import PLANE

CLEAN = 3
BINS = 10


def power(study, fwhm_mm, duration=30.0):
    """The slope of log noise SD against log level over the body, at fwhm_mm."""
    a = np.load(study).astype(np.float64)
    with open(study[:-4] + ".json") as f:
        meta = json.load(f)
    px, dz = float(meta["pixel_mm"]), float(meta["slice_thickness_mm"])
    s = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sig = (s / dz, s / px, s / px)
    frame, clean = a[PLANE[duration]], a[CLEAN]
    noise = gaussian_filter(frame - clean, sig, mode="nearest")
    level = gaussian_filter(clean, sig, mode="nearest")
    body = level > 0.05 * np.percentile(level, 99.9)
    lv, nv = level[body], noise[body]
    edges = np.quantile(lv, np.linspace(0.0, 1.0, BINS + 1))
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (lv >= lo) & (lv < hi)
        if sel.sum() >= 200:
            xs.append(np.log(lv[sel].mean()))
            ys.append(np.log(nv[sel].std()))
    if len(xs) < 3:
        return float("nan")
    return float(np.polyfit(xs, ys, 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, help="a site-matrix grid (`petlab dataset --site all`): one folder per cell")
    ap.add_argument("--fwhm", type=float, nargs="+", default=[5.0, 15.0], help="the guard's scales, mm")
    ap.add_argument("--duration", type=float, choices=[30.0, 60.0], default=30.0)
    a = ap.parse_args(argv)
    cells = sorted(d for d in glob.glob(os.path.join(a.grid, "*")) if os.path.isdir(d))
    if not cells:
        raise SystemExit(f"{a.grid} has no cell folders: make it with `petlab dataset --site all`")
    print(f"| cell | studies | {' | '.join(f'power at {f:g} mm' for f in a.fwhm)} |")
    print("|---|---|" + "---|" * len(a.fwhm))
    per = {f: [] for f in a.fwhm}
    for c in cells:
        studies = sorted(p for p in glob.glob(os.path.join(c, "*.npy")) if not os.path.basename(p).startswith("nema-"))
        if not studies:
            continue
        row = []
        for f in a.fwhm:
            p = float(np.nanmean([power(s, f, a.duration) for s in studies]))
            per[f].append(p)
            row.append(f"{p:.2f}")
        print(f"| {os.path.basename(c)} | {len(studies)} | {' | '.join(row)} |")
    print(f"| **median over cells** | | {' | '.join(f'**{np.median(per[f]):.2f}**' for f in a.fwhm)} |")


if __name__ == "__main__":
    main()
