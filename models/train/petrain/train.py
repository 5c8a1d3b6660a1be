"""Train the restoration network on simulated studies.

    python -m petrain.train --train DATA/train --val DATA/val --out RUN --minutes 40

The loss is a lesion-weighted MSE between the denoised image and the
noise-free reconstruction of the 90 s data (the model's output mix with the
input is fixed, see net.py), plus, with --lesion-mean-weight, the squared
mean error over each patch's lesion voxels: the SUVmean bias a reader would
measure, which a voxel-wise loss lets the network trade for less noise;
and, with --lesion-relative-weight, the mean squared *relative* error over
lesion voxels ((den − y) / y): a lesion in the lung at a tenth of the body
mean weighs as much as one in the liver, as it does in a reader's SUV,
where an absolute error lets the network flatten it for almost nothing;
and, with --lesion-cnr-weight, the mean over lesion voxels of the squared
error in units of the local PET90 noise variance (estimated from the
frame's own noise, input − clean, over a 9 × 9 window, scaled by d / 90):
an error counts by how many PET90 noise SDs a reader would see it as, so
a lung lesion on a quiet background weighs more than a liver lesion of a
heavy patient, whose low-count noise hides the same error;
and, with --lowfreq-weight, the mean squared error after a Gaussian of
--lowfreq-fwhm pixels: the large-scale part of the error (the mean of a
background region, which NEMA's background variability measures) counted
again, where the plain MSE lets the network keep much of the frame's
large-scale noise as if it were anatomy; with --lowfreq-lesion-margin,
lesion voxels (grown by that many pixels) are left out of that term, so a
lesion's deficit cannot be paid for by a surplus around it.
With --texture, --lesion-noise-power P multiplies each patch's lesion
weight by (its frame's noise_px ÷ the batch mean)^P, so lesions of
low-count frames weigh more, and --lowfreq-noise-power Q multiplies each
patch's large-scale term by (the batch mean ÷ its noise_px)^Q, so the
large-scale term weighs less where the frame's counts are low.
The kept weights are those with the lowest loss
on the validation split; the test split is never read here.
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data, net


RELATIVE_FLOOR = 0.05  # body-mean units: below any lesion's clean value in the simulator
CNR_WINDOW = data.NOISE_WINDOW  # pixels of the local noise estimate
CNR_FLOOR = 1e-3  # body-mean units², PET90 noise variance: an SD of 0.03, below the quietest lung in the simulator


def local_power(x, y, context):
    """Mean of (input − clean)² of the centre slice over a CNR_WINDOW² window
    around each pixel (border windows averaged over what they cover)."""
    xc = x[:, context // 2:context // 2 + 1]
    win, pad = (1, 1, CNR_WINDOW, CNR_WINDOW), "SAME"
    s = jax.lax.reduce_window((xc - y) ** 2, 0.0, jax.lax.add, win, (1, 1, 1, 1), pad)
    n = jax.lax.reduce_window(jnp.ones_like(y), 0.0, jax.lax.add, win, (1, 1, 1, 1), pad)
    return s / n


def grow(m, px):
    """Mask m [batch, 1, h, w] (0/1) grown by px pixels (a (2·px + 1)² maximum)."""
    if px <= 0:
        return m
    k = 2 * px + 1
    return jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, 1, 1), "SAME")


def smooth(v, fwhm_px):
    """v [batch, 1, h, w] through a 2D Gaussian of fwhm_px pixels, weights
    renormalised at the patch's edges (the mean of what the kernel covers)."""
    sigma = fwhm_px / 2.3548
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g = jnp.asarray(g / g.sum(), v.dtype)

    def sep(u):
        u = jax.lax.conv_general_dilated(u, g.reshape(1, 1, -1, 1), (1, 1), "SAME")
        return jax.lax.conv_general_dilated(u, g.reshape(1, 1, 1, -1), (1, 1), "SAME")

    return sep(v) / sep(jnp.ones_like(v[:1]))


def local_noise_var90(x, y, context):
    """PET90 noise variance around each pixel: local_power times d / 90 (the
    w channel), floored at CNR_FLOOR."""
    return jnp.maximum(local_power(x, y, context) * x[:, context:context + 1], CNR_FLOOR)


CNR_FRAME_FLOOR = 0.05  # of the frame's typical local noise power


def local_noise_rel(x, y, context, frame_var):
    """local_power relative to the frame's typical one (`frame_var` [B],
    Study.frame_noise_var), floored at CNR_FRAME_FLOOR: 1 on a typical body
    voxel, below 1 on quiet backgrounds (lungs), above in hot organs and lesions."""
    return jnp.maximum(local_power(x, y, context) / frame_var[:, None, None, None], CNR_FRAME_FLOOR)


def lesion_cnr_sq(den, y, m, var90):
    """Sum over lesion voxels of (den − y)² / var90, and their number."""
    return jnp.sum(m * (den - y) ** 2 / var90), jnp.sum(m)


def save_params(path, p, width):
    flat = {f"{k}.{t}": np.asarray(v[t]) for k, v in p.items() for t in ("w", "b")}
    np.savez(path, width=np.array(width), **flat)


def load_params(path):
    z = np.load(path)
    p = {}
    for key in z.files:
        if key == "width":
            continue
        name, t = key.split(".")
        p.setdefault(name, {})[t] = jnp.asarray(z[key])
    return p, int(z["width"])


# what must match between a run and its resumption (the rest, e.g. --eval-every, may differ)
RESUME_ARGS = ("train", "val", "width", "context", "levels", "patch", "batch", "lr", "steps", "lesion_weight", "lesion_fraction", "seed", "limit", "warmup",
               "lesion_mean_weight", "lesion_relative_weight", "lesion_cnr_weight", "lesion_cnr_frame", "noisy_weight", "texture", "select",
               "departing_lesions", "departing_threshold")


# what a checkpoint written before an argument existed ran with
RESUME_DEFAULTS = {"lesion_mean_weight": 0.0, "lesion_relative_weight": 0.0, "lesion_cnr_weight": 0.0, "lesion_cnr_frame": False,
                   "noisy_weight": 0.0, "texture": False, "select": "loss",
                   "departing_lesions": 0.0, "departing_threshold": 0.15}


def save_checkpoint(a, p, st, step, best, history, minutes, rng):
    """The current weights, optimizer state, sampler RNG and history, so a
    run cut off (a session ends) can go on with --resume. Written to a
    temporary name and renamed: a cut mid-write leaves the previous one."""
    ckpt = os.path.join(a.out, "checkpoint.npz")
    arrays = {f"p.{k}.{t}": np.asarray(v[t]) for k, v in p.items() for t in ("w", "b")}
    leaves = jax.tree_util.tree_leaves(st)
    arrays.update({f"s.{j}": np.asarray(x) for j, x in enumerate(leaves)})
    np.savez(ckpt + ".tmp.npz", **arrays)
    meta = {"args": {k: getattr(a, k) for k in RESUME_ARGS}, "step": step, "best": best, "history": history,
            "minutes": minutes, "rng": rng.bit_generator.state, "opt_leaves": len(leaves)}
    with open(ckpt + ".tmp.json", "w") as f:
        json.dump(meta, f, default=float)
    os.replace(ckpt + ".tmp.npz", ckpt)
    os.replace(ckpt + ".tmp.json", os.path.join(a.out, "checkpoint.json"))


def load_checkpoint(a, p, st, rng):
    path = os.path.join(a.out, "checkpoint.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no checkpoint in {a.out} (a run saves one at every validation)")
    with open(path) as f:
        meta = json.load(f)
    for k in RESUME_ARGS:
        if meta["args"].get(k, RESUME_DEFAULTS.get(k)) != getattr(a, k):
            raise SystemExit(f"--resume: --{k.replace('_', '-')} is {getattr(a, k)!r}, the checkpoint's run used {meta['args'][k]!r}")
    z = np.load(os.path.join(a.out, "checkpoint.npz"))
    q = {}
    for key in z.files:
        if key.startswith("p."):
            _, name, t = key.split(".")
            q.setdefault(name, {})[t] = jnp.asarray(z[key])
    if q.keys() != p.keys():
        raise SystemExit(f"--resume: the checkpoint's layers {sorted(q)} are not this network's")
    tree = jax.tree_util.tree_structure(st)
    st = jax.tree_util.tree_unflatten(tree, [jnp.asarray(z[f"s.{j}"]) for j in range(meta["opt_leaves"])])
    rng.bit_generator.state = meta["rng"]
    return q, st, meta["step"], meta["best"], meta["history"], meta["minutes"]


def widen_checked(p, context, x):
    """`net.expand_context`, then a check on the inputs `x` (already `context`
    slices wide) that the widened network computes the same function."""
    old = net.context_of(p)
    q = net.expand_context(p, context)
    pad = (context - old) // 2
    narrow = np.concatenate([x[:, pad:pad + old], x[:, context:]], axis=1)
    diff = same_function(p, narrow, q, x, f"widening the context from {old} to {context}")
    print(f"context widened from {old} to {context} slices (output unchanged: max |diff| {diff:.2g})", flush=True)
    return q


def same_function(p, xp, q, xq, what):
    """Max |difference| between `p` on `xp` and `q` on `xq`; stops the run
    if it exceeds 1e-5 of the output range."""
    y0, y1 = np.asarray(net.forward(p, xp)[0]), np.asarray(net.forward(q, xq)[0])
    diff, span = float(np.abs(y1 - y0).max()), float(y0.max() - y0.min())
    if not diff <= 1e-5 * max(span, 1e-6):
        raise SystemExit(f"{what} changed the output by {diff} (range {span})")
    return diff


def textured_checked(p, x):
    """`net.add_texture`, then a check on the inputs `x` (with texture
    channels) that the textured network computes the same function."""
    q = net.add_texture(p, len(data.TEXTURE))
    diff = same_function(p, x[:, :net.context_of(p) + 1], q, x, "adding the texture inputs")
    print(f"texture inputs added ({', '.join(data.TEXTURE)}; output unchanged: max |diff| {diff:.2g})", flush=True)
    return q


def score(entry, select):
    """Higher is better: the validation loss (negated) or the seed MSE metric (30 s + 60 s)."""
    return -entry["loss"] if select == "loss" else entry["seed_mse_30"] + entry["seed_mse_60"]


def history_line(entry):
    """One validation entry as the trainer prints it: key=value, floats to 4 digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=16, help="channels at full resolution")
    ap.add_argument("--context", type=int, default=net.CONTEXT, help="adjacent slices in (odd; centre slice ± context//2)")
    ap.add_argument("--levels", type=int, default=net.LEVELS, help="U-Net resolution levels (poolings + 1)")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-time budget for training steps")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0 = time budget only)")
    ap.add_argument("--lesion-weight", type=float, default=4.0, help="extra loss weight on lesion voxels")
    ap.add_argument("--lesion-fraction", type=float, default=0.5, help="share of patches centred near a lesion")
    ap.add_argument("--lesion-mean-weight", type=float, default=0.0,
                    help="weight of the squared mean error over the lesion voxels of each patch (SUVmean bias)")
    ap.add_argument("--lesion-relative-weight", type=float, default=0.0,
                    help="weight of the mean squared relative error (den − y) / y over lesion voxels (lesion SUV in %%)")
    ap.add_argument("--lesion-cnr-weight", type=float, default=0.0,
                    help="weight of the mean squared error over lesion voxels in units of the local PET90 noise variance")
    ap.add_argument("--lesion-cnr-frame", action="store_true",
                    help="--lesion-cnr-weight in units of the local noise power relative to the frame's typical one "
                         "(every reconstruction weighs alike; within a frame, quiet backgrounds weigh more)")
    ap.add_argument("--lowfreq-weight", type=float, default=0.0,
                    help="weight of the mean squared error after a Gaussian of --lowfreq-fwhm pixels: the large-scale "
                         "error (a background region's mean, NEMA's background variability) counted again")
    ap.add_argument("--lowfreq-fwhm", type=float, default=4.0, help="FWHM of --lowfreq-weight's Gaussian (pixels)")
    ap.add_argument("--lowfreq-lesion-margin", type=int, default=None,
                    help="leave lesion voxels, grown by this many pixels, out of --lowfreq-weight's term "
                         "(default: every voxel counts)")
    ap.add_argument("--lesion-noise-power", type=float, default=0.0,
                    help="with --texture: lesion weight × (patch frame's noise_px ÷ batch mean)^P (lesions of low-count frames weigh more)")
    ap.add_argument("--lowfreq-noise-power", type=float, default=0.0,
                    help="with --texture: --lowfreq-weight's term × (batch mean ÷ patch frame's noise_px)^Q (less where counts are low)")
    ap.add_argument("--noisy-weight", type=float, default=0.0,
                    help="draw training studies with probability ∝ exp(k · noise_px of the 30 s frame): noisier reconstructions more often")
    ap.add_argument("--departing-lesions", type=float, default=0.0,
                    help="share of the lesion patches drawn from lesions whose short frame moves their mean by at least "
                         "--departing-threshold from the noise-free one (either way)")
    ap.add_argument("--departing-threshold", type=float, default=0.15)
    ap.add_argument("--texture", action="store_true",
                    help="give the network the frame's texture descriptors (data.TEXTURE) as inputs; --init weights without them get zero texture weights")
    ap.add_argument("--select", choices=["loss", "seed_mse"], default="loss",
                    help="which validation measure picks the kept weights: the loss, or the seed MSE metric (30 s + 60 s)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N studies of each split (smoke tests)")
    ap.add_argument("--init", help="start from these weights (params.npz) instead of random ones; a narrower context is widened (net.expand_context)")
    ap.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop at this step (the schedule stays that of --steps), e.g. before a session ends; go on with --resume")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint (saved at every validation); give the same arguments")
    a = ap.parse_args(argv)
    if a.resume and (a.init or not a.steps):
        raise SystemExit("--resume continues a run with a fixed --steps and no --init: give the arguments of the run it continues")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    train = data.load(a.train, a.limit or None)
    val = data.load(a.val, a.limit or None)
    for st in val:
        if st.meta.get("split") not in ("validation", None):
            raise SystemExit(f"{st.path} is from split {st.meta.get('split')!r}, not validation")
    for st in train:
        if st.meta.get("split") == "test":
            raise SystemExit(f"{st.path} is a test study: the test split is never trained on")
    print(f"{len(train)} training and {len(val)} validation studies loaded in {time.time() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(a.seed)
    sampler = data.Sampler(train, a.patch, rng, a.lesion_fraction, a.context, a.texture, a.noisy_weight,
                           a.departing_lesions, a.departing_threshold)
    if a.departing_lesions:
        print(f"{len(sampler.departing)} (study, duration, lesion) cases depart by ≥ {a.departing_threshold:.0%}: "
              f"{a.lesion_fraction * a.departing_lesions:.0%} of the patches", flush=True)
    # Validation slices grouped by matrix (a site-matrix grid mixes 128² to
    # 300²): one stack per shape, metrics pooled over all of them.
    vgroups = []
    for shape in sorted({st.a.shape[2:] for st in val}):
        sts = [st for st in val if st.a.shape[2:] == shape]
        gx, gclean, gp90 = data.full_slices(sts, every=2, context=a.context, textured=a.texture)
        gmask = np.concatenate([np.stack([st.mask[k][None] for d in data.DURATIONS for k in range(0, st.a.shape[1], 2)]) for st in sts]).astype(np.float32)
        gframe = np.array([st.frame_noise_var(d) for st in sts for d in data.DURATIONS for k in range(0, st.a.shape[1], 2)], np.float32)
        vgroups.append((gx, gclean, gp90, gmask, gframe))
    vx = vgroups[0][0]

    p = net.init(jax.random.PRNGKey(a.seed), a.width, a.context, a.levels, len(data.TEXTURE) if a.texture else 0)
    if a.init:
        p, width = load_params(a.init)
        if width != a.width:
            raise SystemExit(f"--init {a.init} has width {width}, not --width {a.width}")
        if net.levels_of(p) != a.levels:
            raise SystemExit(f"--init {a.init} has {net.levels_of(p)} levels, not --levels {a.levels}")
        if net.context_of(p) > a.context:
            raise SystemExit(f"--init {a.init} has context {net.context_of(p)}, more than --context {a.context}")
        if net.texture_of(p) and not a.texture:
            raise SystemExit(f"--init {a.init} takes texture descriptors: give --texture")
        if net.context_of(p) < a.context:
            p = widen_checked(p, a.context, vx[:4] if net.texture_of(p) else vx[:4, :a.context + 1])
        if a.texture and not net.texture_of(p):
            p = textured_checked(p, vx[:4])
    budget_steps = a.steps if a.steps else 10**9
    # cosine decay over the expected number of steps (estimated after warm-up)
    est_steps = a.steps if a.steps else 20000
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, max(est_steps, a.warmup + 200), a.lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-5))
    st = opt.init(p)
    lw, lmw, lrw, lcw = a.lesion_weight, a.lesion_mean_weight, a.lesion_relative_weight, a.lesion_cnr_weight

    def lesion_mean_error(den, y, m):
        """Per patch (or slice): mean of den − y over its lesion voxels (0 without any)."""
        return jnp.sum(m * (den - y), axis=(1, 2, 3)) / jnp.maximum(jnp.sum(m, axis=(1, 2, 3)), 1.0)

    def lesion_relative_sq(den, y, m):
        """Sum over lesion voxels of ((den − y) / y)², y floored at a twentieth
        of the body mean (the normalisation unit), and their number."""
        r = (den - y) / jnp.maximum(y, RELATIVE_FLOOR)
        return jnp.sum(m * r * r), jnp.sum(m)

    def cnr_var(x, y, fv):
        return local_noise_rel(x, y, a.context, fv) if a.lesion_cnr_frame else local_noise_var90(x, y, a.context)

    lfw = a.lowfreq_weight
    lnp, lfnp = a.lesion_noise_power, a.lowfreq_noise_power
    if (lnp or lfnp) and not a.texture:
        raise SystemExit("--lesion-noise-power and --lowfreq-noise-power read the frame's noise_px: give --texture")
    noise_ch = a.context + 1  # after the slices and the duration channel: data.TEXTURE[0], noise_px

    def noise_rel(x):
        """Each patch's frame noise_px over the batch mean, [batch, 1, 1, 1]."""
        n = jnp.maximum(x[:, noise_ch, 0, 0], 1e-6)
        return (n / jnp.mean(n))[:, None, None, None]

    def loss_fn(p, x, y, m, fv):
        _, den = net.forward(p, x)
        wl = lw * noise_rel(x) ** lnp if lnp else lw
        loss = jnp.mean((1.0 + wl * m) * (den - y) ** 2)
        if lfw:
            e = den - y if a.lowfreq_lesion_margin is None else (den - y) * (1.0 - grow(m, a.lowfreq_lesion_margin))
            s2 = smooth(e, a.lowfreq_fwhm) ** 2
            loss = loss + lfw * jnp.mean(s2 * noise_rel(x) ** (-lfnp) if lfnp else s2)
        if lmw:
            loss = loss + lmw * jnp.mean(lesion_mean_error(den, y, m) ** 2)
        if lrw:
            sq, n = lesion_relative_sq(den, y, m)
            loss = loss + lrw * sq / jnp.maximum(n, 1.0)
        if lcw:
            sq, n = lesion_cnr_sq(den, y, m, cnr_var(x, y, fv))
            loss = loss + lcw * sq / jnp.maximum(n, 1.0)
        return loss

    @jax.jit
    def step(p, st, x, y, m, fv):
        l, g = jax.value_and_grad(loss_fn)(p, x, y, m, fv)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, l

    fwd = jax.jit(net.forward)

    def validate(p):
        sums = {"loss": 0.0, "n": 0, "lesion_mean": 0.0, "slices": 0, "rel_sq": 0.0, "rel_n": 0.0, "cnr_sq": 0.0}
        for d in data.DURATIONS:
            sums[f"num_{int(d)}"], sums[f"den_{int(d)}"] = 0.0, 0.0
        for gx, gclean, gp90, gmask, gframe in vgroups:
            outs, dens = [], []
            for i in range(0, len(gx), 16):
                o, dn = fwd(p, gx[i:i + 16])
                outs.append(np.asarray(o)); dens.append(np.asarray(dn))
            out, den = np.concatenate(outs), np.concatenate(dens)
            sums["loss"] += float(np.sum((1 + lw * gmask) * (den - gclean) ** 2))
            sums["n"] += den.size
            sums["lesion_mean"] += float(np.sum(np.asarray(lesion_mean_error(den, gclean, gmask)) ** 2))
            sums["slices"] += len(den)
            sq, n = lesion_relative_sq(den, gclean, gmask)
            sums["rel_sq"] += float(sq); sums["rel_n"] += float(n)
            sums["cnr_sq"] += float(lesion_cnr_sq(den, gclean, gmask, cnr_var(gx, gclean, gframe))[0])
            # val slices are ordered study → duration → slice; split by the w channel
            for d in data.DURATIONS:
                sel = np.isclose(gx[:, a.context, 0, 0], d / 90.0)
                xc = gx[sel, a.context // 2:a.context // 2 + 1]
                sums[f"num_{int(d)}"] += float(np.sum((out[sel] - gp90[sel]) ** 2))
                sums[f"den_{int(d)}"] += float(np.sum((xc - gp90[sel]) ** 2))
        rel = sums["rel_sq"] / max(sums["rel_n"], 1.0)
        cnr = sums["cnr_sq"] / max(sums["rel_n"], 1.0)
        res = {"loss": sums["loss"] / sums["n"] + lmw * sums["lesion_mean"] / sums["slices"] + lrw * rel + lcw * cnr,
               "lesion_mean_rms": (sums["lesion_mean"] / sums["slices"]) ** 0.5, "lesion_relative_rms": rel ** 0.5,
               "lesion_cnr_rms": cnr ** 0.5}
        for d in data.DURATIONS:
            res[f"seed_mse_{int(d)}"] = 100 * (1 - sums[f"num_{int(d)}"] / sums[f"den_{int(d)}"])
        return res

    log = {"args": vars(a), "history": [], "versions": {"jax": jax.__version__, "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()},
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "params": net.param_count(p),
           "gflop_per_192_slice": net.flops_per_pixel(a.width, a.context, a.levels) * 192 * 192 / 1e9}
    best = None
    t_train = time.time()
    i = 0
    losses = []
    prior_minutes = 0.0
    if a.resume:
        p, st, i, best, log["history"], prior_minutes = load_checkpoint(a, p, st, rng)
        print(f"resumed at step {i} of {a.steps} ({prior_minutes:.1f} min trained before)", flush=True)
    stop = min(budget_steps, a.stop_after) if a.stop_after else budget_steps
    if a.init and not a.resume:
        # the starting weights are the first candidate: a fine-tune that never
        # beats them on validation keeps them, and the history shows where it began
        v = validate(p)
        best = {"step": 0, "minutes": 0.0, "train_loss": None, **v}
        log["history"].append(best)
        save_params(os.path.join(a.out, "params.npz"), p, a.width)
        print(history_line(best) + " * (the starting weights)", flush=True)
        t_train = time.time()
    while i < stop and (a.steps or time.time() - t_train < a.minutes * 60):
        x, y, m, _, fv = sampler.batch(a.batch, frame_var=True)
        p, st, l = step(p, st, x, y, m, fv)
        losses.append(l)  # a device array: no sync per step, so on a GPU the next batch is sampled while this one runs
        i += 1
        if i % a.eval_every == 0 or i == stop:
            losses = [float(v) for v in jax.device_get(losses[-a.eval_every:])]
            v = validate(p)
            entry = {"step": i, "minutes": prior_minutes + (time.time() - t_train) / 60, "train_loss": float(np.mean(losses)), **v}
            log["history"].append(entry)
            better = best is None or score(entry, a.select) > score(best, a.select)
            if better:
                best = entry
                save_params(os.path.join(a.out, "params.npz"), p, a.width)
            print(history_line(entry) + (" *" if better else ""), flush=True)
            save_checkpoint(a, p, st, i, best, log["history"], entry["minutes"], rng)
    if best is None:
        v = validate(p)
        best = {"step": i, **v}
        save_params(os.path.join(a.out, "params.npz"), p, a.width)
    log["steps"] = i
    log["train_minutes"] = prior_minutes + (time.time() - t_train) / 60
    log["best"] = best
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1, default=float)
    if a.steps and i < a.steps:
        print(f"stopped at step {i} of {a.steps} (--stop-after); go on with the same arguments and --resume", flush=True)
    print(f"done: {i} steps in {log['train_minutes']:.1f} min; best at step {best['step']} by {a.select} (val loss {best['loss']:.4g}, "
          f"seed MSE {best['seed_mse_30']:.2f} / {best['seed_mse_60']:.2f}); weights in {a.out}/params.npz", flush=True)


if __name__ == "__main__":
    main()
