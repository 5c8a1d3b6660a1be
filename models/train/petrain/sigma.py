"""A learned σ for a fixed restoration network: train and measure.

    python -m petrain.sigma --params R/params.npz --train DATA --grid VALGRID --out RUN --steps 2000
    python -m petrain.sigma --params R/params.npz --head RUN/sigma_params.npz --grid OTHER --out RUN2

σ is the predicted standard deviation of PET90 − R per voxel, R the
restored (90 s-equivalent) image of the network in --params (docs/QUALITY.md
"Uncertainty"). Here a small second network (the same 2.5D U-Net as net.py,
narrower) sees what the restoration network saw (the context slices, the
duration channel, the frame's texture descriptors) plus its denoised image
and its change to the centre slice, and predicts log σ². It is trained with
a Gaussian negative log-likelihood of PET90 − R over body voxels, across the
randomized reconstructions of --train, while R's weights stay fixed: so σ
learns the network's own error where it makes it (a reconstruction it
under-smooths, a lesion it flattens), which the engines' analytic σ (noise
and texture terms) can only scale per class.

Nothing is selected on --grid: the kept weights are those after --steps.
The grid (a site matrix, `petlab dataset --site all`) is then measured once:
coverage of R ± σ and R ± 1.96 σ per cell and tissue, with the tissues
petlab's `uncertainty::tissues` uses (body: inside 2 % of the truth's
maximum, 0.5–2.5 × its body mean, lesion spheres left out; hot: ≥ 2.5 ×),
printed as a table and written to RUN/coverage.json.
"""
import argparse
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data, net, train

LOG_FLOOR, LOG_CEIL = -14.0, 4.0  # log σ² in body-mean units², held within
LOG_START = float(np.log(1e-3))  # the head's bias at the start: σ of 3 % of the body mean
BODY_CLEAN = 0.1  # body-mean units: voxels of the clean image above this enter the likelihood
Z68, Z95 = 1.0, 1.959964


def head_input(x, den, k):
    """The σ network's input: the k context slices, the denoised image, its
    change to the centre slice (den − x_c), then the duration (and texture)
    channels. Its `context` (net.context_of) is k + 2."""
    xc = x[:, k // 2:k // 2 + 1]
    return jnp.concatenate([x[:, :k], den, den - xc, x[:, k:]], axis=1)


def restore(pr, x, textured_r):
    """R's (out, den) on x, which always carries the texture channels."""
    k = net.context_of(pr)
    return net.forward(pr, x if textured_r else x[:, :k + 1])


def log_var(ph, hx):
    kh = net.context_of(ph)
    t = jnp.mean(hx[:, kh + 1:], axis=(2, 3)) if net.texture_of(ph) else None
    h = net.residual(ph, hx[:, :kh + 1], t) + LOG_START
    return jnp.clip(h, LOG_FLOOR, LOG_CEIL)


def tissues(st):
    """Per voxel of the study: 0 body, 1 hot, 2 lesion, 3 low (lungs), -1 outside (petlab's rule)."""
    truth = st.a[data.TRUTH]
    top = float(truth.max())
    m = float(truth[truth > 0.05 * top].mean())
    out = np.full(truth.shape, -1, np.int8)
    inside = truth > 0.02 * top
    out[inside] = 0
    out[inside & (truth >= 2.5 * m)] = 1
    out[inside & (truth < 0.5 * m)] = 3
    out[data.lesion_mask(st.meta, truth.shape, margin_px=0.0)] = 2
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", required=True, help="the restoration network's weights (train.save_params, or from_onnx)")
    ap.add_argument("--train", help="training studies (not with --head)")
    ap.add_argument("--grid", required=True, help="a site-matrix folder (one subfolder per cell), measured once at the end")
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N studies (smoke tests)")
    ap.add_argument("--head", help="measure these head weights (a run's sigma_params.npz) on --grid instead of training; --train is not read")
    ap.add_argument("--per-study", action="store_true",
                    help="also print each study's body coverage and mean (PET90 − R)² ÷ mean σ², and how far two studies of one cell differ")
    ap.add_argument("--tta-spread", action="store_true",
                    help="with --per-study, also run each slice flipped left-right and up-down (the engines' three test-time passes) "
                         "and record per study the body mean of the passes' variance about their mean, and of (x − R)², each ÷ mean σ²")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    pr, _ = train.load_params(a.params)
    k, textured_r = net.context_of(pr), bool(net.texture_of(pr))
    if a.head:
        ph, _ = train.load_params(a.head)
        if net.context_of(ph) != k + 2:
            raise SystemExit(f"--head {a.head} takes {net.context_of(ph) - 2} context slices, the network in --params {k}")
        measure(a, pr, ph, k, textured_r, [])
        return
    if not a.train:
        raise SystemExit("give --train (studies to train the head on) or --head (weights to measure)")
    studies = data.load(a.train, a.limit or None)
    for st in studies:
        if st.meta.get("split") == "test":
            raise SystemExit(f"{st.path} is a test study: the test split is never trained on")
    rng = np.random.default_rng(a.seed)
    sampler = data.Sampler(studies, a.patch, rng, 0.5, k, True)
    ph = net.init(jax.random.PRNGKey(a.seed), a.width, k + 2, a.levels, len(data.TEXTURE))
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, 100, max(a.steps, 300), a.lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-5))
    ost = opt.init(ph)

    def nll(ph, x, y, y90):
        out, den = restore(pr, x, textured_r)
        lv = log_var(ph, head_input(x, jax.lax.stop_gradient(den), k))
        e2 = (y90 - jax.lax.stop_gradient(out)) ** 2
        m = (y > BODY_CLEAN).astype(jnp.float32)
        return jnp.sum(m * 0.5 * (lv + e2 * jnp.exp(-lv))) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(ph, ost, x, y, y90):
        v, g = jax.value_and_grad(nll)(ph, x, y, y90)
        u, ost = opt.update(g, ost, ph)
        return optax.apply_updates(ph, u), ost, v

    t0, hist, losses = time.time(), [], []
    for i in range(1, a.steps + 1):
        x, y, _, y90 = sampler.batch(a.batch)
        ph, ost, v = step(ph, ost, x, y, y90)
        losses.append(v)
        if i % 250 == 0 or i == a.steps:
            mean = float(np.mean(jax.device_get(losses)))
            losses = []
            hist.append({"step": i, "minutes": (time.time() - t0) / 60, "nll": mean})
            print(f"step={i} minutes={hist[-1]['minutes']:.2f} train_nll={mean:.4f}", flush=True)
    train.save_params(os.path.join(a.out, "sigma_params.npz"), ph, a.width)
    measure(a, pr, ph, k, textured_r, hist)


def measure(a, pr, ph, k, textured_r, hist):
    """Coverage on every cell (subfolder) of a.grid, printed and written to a.out/coverage.json."""
    fwd = jax.jit(lambda x: (lambda o: (o[0], log_var(ph, head_input(x, o[1], k))))(restore(pr, x, textured_r)))
    cells, rows, studies = {}, [], []
    for cell in sorted(os.listdir(a.grid)):
        folder = os.path.join(a.grid, cell)
        if not os.path.isdir(folder):
            continue
        for d in data.DURATIONS:
            acc = {t: [0, 0, 0] for t in ("body", "hot", "lesion", "low")}
            rel = [0.0, 0.0]
            for st in data.load(folder):
                tis = tissues(st)
                own = [0, 0, 0.0, 0.0, 0.0, 0.0]  # body voxels, within R ± σ, Σ e², Σ σ², Σ TTA variance, Σ (x − R)²
                halves = [[0, 0], [0, 0]]  # the same counts in the first and the second half of the slices
                nz = st.a.shape[1]
                for z in range(nz):
                    x = st.model_input(d, z, k, True)[None]
                    out, lv = fwd(x)
                    r = np.asarray(out)[0, 0] * st.scale[d]
                    s = np.exp(0.5 * np.asarray(lv)[0, 0]) * st.scale[d]
                    if a.tta_spread:
                        passes = [r] + [np.flip(np.asarray(fwd(np.flip(x, ax))[0])[0, 0], ax - 2) * st.scale[d] for ax in (3, 2)]
                        tta_var = np.var(np.stack(passes), axis=0)
                        change2 = (np.asarray(x)[0, k // 2] * st.scale[d] - r) ** 2
                    e = np.abs(st.a[data.PLANE[90.0], z] - r)
                    for j, name in enumerate(("body", "hot", "lesion", "low")):
                        sel = tis[z] == j
                        acc[name][0] += int(sel.sum())
                        acc[name][1] += int((e[sel] <= Z68 * s[sel]).sum())
                        acc[name][2] += int((e[sel] <= Z95 * s[sel]).sum())
                    body = (tis[z] >= 0) & (tis[z] != 3)
                    rel[0] += float(s[body].sum()); rel[1] += float(r[body].sum())
                    sel = tis[z] == 0
                    own[0] += int(sel.sum()); own[1] += int((e[sel] <= Z68 * s[sel]).sum())
                    own[2] += float((e[sel].astype(np.float64) ** 2).sum()); own[3] += float((s[sel].astype(np.float64) ** 2).sum())
                    if a.tta_spread:
                        own[4] += float(tta_var[sel].astype(np.float64).sum()); own[5] += float(change2[sel].astype(np.float64).sum())
                    h = halves[int(2 * z >= nz)]
                    h[0] += int(sel.sum()); h[1] += int((e[sel] <= Z68 * s[sel]).sum())
                if own[0]:
                    studies.append({"cell": cell, "duration": int(d), "study": os.path.basename(st.path),
                                    "body_68": 100 * own[1] / own[0], "e2_over_sigma2": own[2] / max(own[3], 1e-30),
                                    "body_68_halves": [100 * h[1] / h[0] if h[0] else None for h in halves]})
                    if a.tta_spread:
                        studies[-1]["tta_var_over_sigma2"] = own[4] / max(own[3], 1e-30)
                        studies[-1]["change2_over_sigma2"] = own[5] / max(own[3], 1e-30)
            cov = {t: ([100 * v[1] / v[0], 100 * v[2] / v[0]] if v[0] else None) for t, v in acc.items()}
            cells.setdefault(cell, {})[int(d)] = {"coverage": cov, "body_sigma_over_r_pct": 100 * rel[0] / max(rel[1], 1e-12)}
            fmt = lambda c: "— / —" if c is None else f"{c[0]:.1f} / {c[1]:.1f}"
            rows.append(f"| {cell} | {int(d)} s | {fmt(cov['body'])} | {fmt(cov['hot'])} | {fmt(cov['lesion'])} | {100 * rel[0] / max(rel[1], 1e-12):.1f} |")
    body = [c[d]["coverage"]["body"] for c in cells.values() for d in c]
    worst68 = max(abs(b[0] - 68.27) for b in body)
    worst95 = max(abs(b[1] - 95.0) for b in body)
    within = sum(abs(b[0] - 68.27) <= 3 for b in body)
    print("| cell | frame | body 68 / 95 | hot 68 / 95 | lesion 68 / 95 | body σ ÷ R (%) |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"worst body distance from 68.27 / 95 %: {worst68:.1f} / {worst95:.1f} points; body rows within ±3 points: {within} of {len(body)}")
    if a.per_study:
        per_study(studies)
    with open(os.path.join(a.out, "coverage.json"), "w") as f:
        json.dump({"args": vars(a), "history": hist, "cells": cells, "worst_body_68": worst68, "worst_body_95": worst95,
                   "body_rows_within_3": within, "studies": studies}, f, indent=1)


def per_study(studies):
    """Each study's body coverage of R ± σ and its mean e² ÷ mean σ² (1 for
    a σ of the right scale), then the spread between studies of one cell and
    frame: what one patient per cell can resolve."""
    print("| cell | frame | study | body 68 | mean e² ÷ mean σ² |\n|---|---|---|---|---|")
    for s in studies:
        print(f"| {s['cell']} | {s['duration']} s | {s['study']} | {s['body_68']:.1f} | {s['e2_over_sigma2']:.2f} |")
    spread = sorted(max(v) - min(v) for v in by_cell_frame(studies) if len(v) > 1)
    within = sum(abs(s["body_68"] - 68.27) <= 3 for s in studies)
    line = f"studies within ±3 points of 68.27 %: {within} of {len(studies)}"
    if spread:
        line += (f"; between studies of one cell and frame the body coverage differs by "
                 f"{statistics.median(spread):.1f} points (median), {spread[-1]:.1f} at most")
    print(line)
    print(sampling_line(studies))


def by_cell_frame(studies):
    """The studies' body coverage, one list per cell and frame."""
    groups = {}
    for s in studies:
        groups.setdefault((s["cell"], s["duration"]), []).append(s["body_68"])
    return list(groups.values())


def sampling_line(studies):
    """How much of the spread between patients is sampling: the body
    coverage of the two halves of one study's slices differ by sampling
    noise and by the anatomy of each half only (one patient, one
    reconstruction); two studies of one cell and frame differ by sampling
    and by a per-patient error. With halves' differences d_h and studies'
    differences d_s (every pair of one cell and frame), the sampling SD of one whole study's coverage is at
    most RMS(d_h) / 2 (the halves' anatomy adds to d_h) and the
    per-patient SD at least sqrt(RMS(d_s)² / 2 − RMS(d_h)² / 4)."""
    dh = [s["body_68_halves"][0] - s["body_68_halves"][1] for s in studies
          if None not in s.get("body_68_halves", [None])]
    ds = [a - b for v in by_cell_frame(studies) for a, b in itertools.combinations(v, 2)]
    if not dh:
        return "no study with body voxels in both halves of its slices"
    rms_h = float(np.sqrt(np.mean(np.square(dh))))
    line = (f"halves of one study (first and second half of its slices) differ by {rms_h:.1f} points RMS over "
            f"{len(dh)} study frames: sampling SD of one study's body coverage ≈ {rms_h / 2:.1f} points (at most)")
    if ds:
        rms_s = float(np.sqrt(np.mean(np.square(ds))))
        patient = float(np.sqrt(max(rms_s ** 2 / 2 - rms_h ** 2 / 4, 0.0)))
        line += (f"; two studies of one cell and frame differ by {rms_s:.1f} points RMS over {len(ds)} pairs: "
                 f"per-patient SD beyond sampling ≈ {patient:.1f} points (at least)")
    return line


if __name__ == "__main__":
    main()
