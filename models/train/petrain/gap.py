"""Where a model falls short of a perfect denoiser, by kind of tissue.

    python -m petrain.gap --params RUN/params.npz --dataset DATA/val [--tta 4]

The seed MSE metric of a model and of the oracle (`w·short + (1 − w)·clean90`,
the model's output form with the noise-free 90 s reconstruction as its
denoiser; `petlab eval` has the same row) differ by the gap

    Σ (out − PET90)² − Σ (oracle − PET90)²   over Σ (short − PET90)²,

in metric points, per study and then averaged over studies as `petrestore
eval` does. This splits the gap exactly (the regions partition the
voxels, so the shares add up to it) by the truth's activity: air, cold
(< 0.3 × body mean: lungs), the bulk of the body, hot organs (≥ 2 × body
mean) and lesions (within a voxel of their spheres), and by slice: the two
slab ends, where the slice context repeats the edge, against the rest.
It also prints the denoiser's mean bias against clean90 per region (%),
which says whether a region's share is shrinkage or noise. Use it on the
validation split: the test split is never used for choices.
"""
import argparse

import jax
import numpy as np

from . import data, net, train

REGIONS = ("air", "cold", "body", "hot", "lesion")


def regions(st):
    """Masks that partition the study's voxels (same order as REGIONS)."""
    tr = st.a[data.TRUTH]
    bm = float(tr[tr > 0].mean())
    les = st.mask
    return [tr <= 0, (tr > 0) & (tr < 0.3 * bm) & ~les, (tr >= 0.3 * bm) & (tr < 2 * bm) & ~les, (tr >= 2 * bm) & ~les, les]


def denoise(fwd, p, st, d, tta):
    """den (Bq/ml) for every slice of the study, averaged over `tta` flips as the engines do."""
    s = st.a.shape[1]
    x = np.stack([st.model_input(d, k, net.context_of(p), net.texture_of(p) > 0) for k in range(s)])
    flips = [(), (3,), (2,), (2, 3)][:tta]
    acc = np.zeros((s,) + x.shape[2:], np.float32)
    for f in flips:
        xf = np.flip(x, f) if f else x
        den = np.concatenate([np.asarray(fwd(p, xf[i:i + 8])[1]) for i in range(0, s, 8)])[:, 0]
        acc += np.flip(den, tuple(a - 1 for a in f)) if f else den
    return acc / len(flips) * st.scale[d]


def gap(p, studies, tta=1):
    """{duration: {"model", "oracle", "n", regions..., "ends", "inner"}}: metrics and gap shares in points."""
    fwd = jax.jit(net.forward)
    res = {}
    for d in data.DURATIONS:
        w = d / 90.0
        m_err = o_err = 0.0
        share = {r: 0.0 for r in REGIONS + ("ends", "inner")}
        voxels = {r: 0 for r in REGIONS}
        bias = {r: [0.0, 0.0] for r in REGIONS}
        for st in studies:
            x, p90, clean = st.a[data.PLANE[d]], st.a[data.PLANE[90.0]], st.a[data.CLEAN]
            den = denoise(fwd, p, st, d, tta)
            out, orc = w * x + (1 - w) * den, w * x + (1 - w) * clean
            e_m, e_o = (out - p90) ** 2, (orc - p90) ** 2
            norm = float(np.sum((x - p90) ** 2)) * len(studies)  # points of this study's metric, averaged
            m_err += float(e_m.sum()) / norm
            o_err += float(e_o.sum()) / norm
            g = (e_m - e_o) / norm
            for r, m in zip(REGIONS, regions(st), strict=False):
                share[r] += float(g[m].sum())
                voxels[r] += int(m.sum())
                bias[r][0] += float((den - clean)[m].sum())
                bias[r][1] += float(clean[m].sum())
            share["ends"] += float(g[[0, -1]].sum())
            share["inner"] += float(g[1:-1].sum())
        res[d] = {"model": 100 * (1 - m_err), "oracle": 100 * (1 - o_err), "voxels": voxels,
                  "bias": {r: 100 * b / c if c > 0 else 0.0 for r, (b, c) in bias.items()}, **{k: 100 * v for k, v in share.items()}}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", required=True, help="weights (params.npz) of a training run")
    ap.add_argument("--dataset", required=True, help="studies from `petlab dataset` (the validation split)")
    ap.add_argument("--tta", type=int, default=1, choices=(1, 2, 3, 4),
                    help="as io.tta of a package: 2 also runs the slices flipped left-right, 3 and up-down, 4 and both, averaged")
    a = ap.parse_args(argv)
    p, _ = train.load_params(a.params)
    studies = data.load(a.dataset)
    if any(st.meta.get("split") == "test" for st in studies):
        raise SystemExit(f"{a.dataset} holds test studies: judge choices on the validation split")
    for d, r in gap(p, studies, a.tta).items():
        total = r["oracle"] - r["model"]
        print(f"{int(d)} s: seed MSE metric model {r['model']:.2f}, oracle {r['oracle']:.2f}, gap {total:.2f} points (tta {a.tta}, {len(studies)} studies)")
        print(f"  {'region':7s} {'voxels %':>9s} {'gap points':>11s} {'den bias vs clean90 %':>22s}")
        n = sum(r["voxels"].values())
        for k in REGIONS:
            print(f"  {k:7s} {100 * r['voxels'][k] / n:9.2f} {r[k]:11.2f} {r['bias'][k]:22.2f}")
        print(f"  slab end slices {r['ends']:.2f}, inner slices {r['inner']:.2f} points")


if __name__ == "__main__":
    main()
