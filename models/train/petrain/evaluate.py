"""Independent re-implementation of `petlab eval`'s metrics, to
cross-check the Rust evaluator (crates/petrestore/src/eval/metrics.rs and crates/petlab/src/eval.rs).

    petlab eval --dataset D --val V --model M --json R.json --dump DUMP
    python -m petrain.evaluate --dataset D --report R.json --dump DUMP

Recomputes every per-study record (MSE and 1−SSIM vs PET90, NRMSE and SSIM
vs truth, lesion mean/max) from the dataset and the dumped restored volumes
with NumPy, and fails if any differs from the Rust report by more than
1e-3 relative (1e-5 absolute for SSIM).
"""
import argparse
import json
import os

import numpy as np

PET90, TRUTH = 2, 4


def mse(a, b):
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def nrmse_body(img, truth):
    m = truth > 0
    return float(100 * np.sqrt(np.mean((img[m].astype(np.float64) - truth[m]) ** 2)) / np.mean(truth[m].astype(np.float64)))


def _kernel():
    k = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    return k / k.sum()


def _blur(img):
    """Separable Gaussian blur; weights outside the image dropped, rest renormalised."""
    k = _kernel()
    def along(a, axis):
        n = a.shape[axis]
        ones = np.ones(n)
        num = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, a)
        den = np.convolve(ones, k, mode="same")
        shape = [1, 1]; shape[axis] = n
        return num / den.reshape(shape)
    return along(along(img, 1), 0)


def ssim(a, b, rng):
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    total = 0.0
    for z in range(a.shape[0]):
        x, y = a[z].astype(np.float64), b[z].astype(np.float64)
        mx, my = _blur(x), _blur(y)
        vx, vy, cxy = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
        total += np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(total / a.shape[0])


def sphere_voxels(shape, spacing, centre, radius):
    nz, ny, nx = shape
    sx, sy, sz = spacing
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    d2 = ((zz - centre[0]) * sz) ** 2 + ((yy - centre[1]) * sy) ** 2 + ((xx - centre[2]) * sx) ** 2
    m = d2 <= radius * radius
    if not m.any():
        z = min(max(int(round(centre[0])), 0), nz - 1)
        y = min(max(int(round(centre[1])), 0), ny - 1)
        x = min(max(int(round(centre[2])), 0), nx - 1)
        m[z, y, x] = True
    return m


def records_for(study_path, dump, methods):
    a = np.load(study_path)
    meta = json.load(open(study_path[:-4] + ".json"))
    name = os.path.basename(study_path)[:-4]
    px, dz = meta["pixel_mm"], meta["slice_thickness_mm"]
    p90, truth = a[PET90], a[TRUTH]
    r90, rt = float(p90.max()), float(truth.max())
    out = {}
    for d, plane in ((30, 0), (60, 1)):
        short = a[plane]
        for m in methods:
            img = short if m == "input" else np.load(os.path.join(dump, f"{name}-{m}-{d}.npy"))
            rec = {
                "mse_pet90": mse(img, p90), "mse_short_pet90": mse(short, p90),
                "dssim_pet90": 1 - ssim(img, p90, r90), "dssim_short_pet90": 1 - ssim(short, p90, r90),
                "nrmse_truth": nrmse_body(img, truth), "ssim_truth": ssim(img, truth, rt), "lesions": [],
            }
            if meta["source"] != "nema":
                for l in meta["lesions"]:
                    mask = sphere_voxels(img.shape, (px, px, dz), (l["slice"], l["row"], l["col"]), l["diameter_mm"] / 2)
                    rec["lesions"].append([l["diameter_mm"], float(img[mask].mean()), float(img[mask].max()),
                                           float(p90[mask].mean()), float(p90[mask].max()), l["activity_bqml"]])
            out[(name, float(d), m)] = rec
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--dump", required=True)
    a = ap.parse_args(argv)
    rep = json.load(open(a.report))
    methods = sorted({r["method"] for r in rep["records"] if r["method"] not in ("pet90",)})
    ours = {}
    for f in sorted(os.listdir(a.dataset)):
        if f.endswith(".npy"):
            ours.update(records_for(os.path.join(a.dataset, f), a.dump, methods))
    checked, worst = 0, 0.0
    for r in rep["records"]:
        key = (r["study"], float(r["duration_s"]), r["method"])
        if key not in ours:
            continue
        mine = ours[key]
        for k in ("mse_pet90", "mse_short_pet90", "dssim_pet90", "dssim_short_pet90", "nrmse_truth", "ssim_truth"):
            tol = 1e-5 if "ssim" in k else 1e-3 * max(abs(mine[k]), 1e-12)
            diff = abs(mine[k] - r[k])
            worst = max(worst, diff / max(abs(mine[k]), 1e-12))
            if diff > tol:
                raise SystemExit(f"{key} {k}: Rust {r[k]} vs Python {mine[k]}")
            checked += 1
        for lr, lp in zip(r["lesions"], mine["lesions"], strict=False):
            for x, y in zip(lr, lp, strict=False):
                if abs(x - y) > 1e-3 * max(abs(y), 1e-9):
                    raise SystemExit(f"{key} lesion: Rust {lr} vs Python {lp}")
                checked += 1
    if checked == 0:
        raise SystemExit("nothing compared: do --report and --dump come from the same `petlab eval` run on --dataset?")
    print(f"cross-check OK: {checked} values agree (worst relative difference {worst:.2e})")


if __name__ == "__main__":
    main()
