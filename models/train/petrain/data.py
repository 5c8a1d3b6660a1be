"""Simulated studies (from `petlab dataset`) and the training sampler.

A study file `<family>-<seed>.npy` is float32 [5, S, n, n]: PET30, PET60,
PET90, the noise-free reconstruction of the 90 s data, and the truth, all in
Bq/ml; `<family>-<seed>.json` lists lesions in voxel coordinates.
"""
import glob
import json
import os

import numpy as np

from .net import CONTEXT

DURATIONS = (30.0, 60.0)
PLANE = {30.0: 0, 60.0: 1, 90.0: 2}
CLEAN, TRUTH = 3, 4


def body_scale(vol, fraction=0.05):
    """Mean of voxels above `fraction` × the 99.9th percentile: the same
    normalisation as the Rust engines (crates/petrestore/src/restore/neural.rs)."""
    body = vol[vol > body_threshold(vol, fraction)]
    return float(body.mean())


TEXTURE = ("noise_px", "noise_2px", "axial_corr")


def body_threshold(vol, fraction=0.05):
    """The body is every voxel above `fraction` × the 99.9th percentile (of a
    strided sample): body_scale's mask."""
    sample = vol.reshape(-1)[::7]
    p999 = np.sort(sample)[min(int(len(sample) * 0.999), len(sample) - 1)]
    return p999 * fraction


def _highpass(v):
    """v[z, y, x] − the mean of its four in-plane neighbours, interior pixels."""
    n4 = ((v[:, :-2, 1:-1] + v[:, 2:, 1:-1]) + v[:, 1:-1, :-2]) + v[:, 1:-1, 2:]
    return v[:, 1:-1, 1:-1] - np.float32(0.25) * n4


def _median_abs(d):
    """The (n//2)-th smallest |d| of every 4th value: the engines' definition."""
    a = np.abs(d[::4])
    return float(np.partition(a, len(a) // 2)[len(a) // 2]) if len(a) else 0.0


def texture(vol, fraction=0.05):
    """What the image says about its own reconstruction, as the network is
    told it (model.toml `io.texture`; the same definitions as the engines,
    crates/petrestore/src/restore/texture.rs), all relative to the body mean:

    - noise_px: ln of the median |high-pass| over body voxels, the high-pass
      being a voxel minus the mean of its four in-plane neighbours;
    - noise_2px: the same on 2×2-binned planes (correlated noise, e.g. a
      post-filter, loses less there than white noise);
    - axial_corr: the correlation of the high-pass between adjacent slices
      over voxels in the body on both (a 3D filter or thin slices raise it).
    """
    vol = np.asarray(vol, np.float32)
    thr = body_threshold(vol, fraction)
    scale = body_scale(vol, fraction)
    d = _highpass(vol)
    inner = vol[:, 1:-1, 1:-1] > thr
    s, n, m = vol.shape
    b = vol[:, :n // 2 * 2, :m // 2 * 2].reshape(s, n // 2, 2, m // 2, 2)
    b = ((b[:, :, 0, :, 0] + b[:, :, 0, :, 1]) + b[:, :, 1, :, 0] + b[:, :, 1, :, 1]) * np.float32(0.25)
    d2 = _highpass(b)
    inner2 = b[:, 1:-1, 1:-1] > thr
    both = inner[:-1] & inner[1:]
    lo, hi = d[:-1][both].astype(np.float64), d[1:][both].astype(np.float64)
    den = np.sqrt(np.sum(lo * lo) * np.sum(hi * hi))
    corr = float(np.sum(lo * hi) / den) if den > 0 else 0.0
    floor = 1e-6 * scale
    return np.array([np.log(max(_median_abs(d[inner]), floor) / scale), np.log(max(_median_abs(d2[inner2]), floor) / scale), corr], np.float32)


NOISE_WINDOW = 9  # pixels: the window of the local noise power (train.local_noise_var)


def box_mean(v, n):
    """Mean over an n × n in-plane window around every pixel of v[z, y, x]
    (n odd), over the part of the window inside the image."""
    def along(a, axis):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (1, 0)
        c = np.cumsum(np.pad(a, pad), axis=axis)
        size = a.shape[axis]
        lo = np.clip(np.arange(size) - n // 2, 0, size)
        hi = np.clip(np.arange(size) + n // 2 + 1, 0, size)
        return np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis), (hi - lo)
    s, cy = along(v, 1)
    s, cx = along(s, 2)
    return s / (cy[None, :, None] * cx[None, None, :])


def lesion_mask(meta, shape, margin_px=1.0):
    """Voxels within (radius + margin) of a lesion centre."""
    s, n, _ = shape
    px, dz = meta["pixel_mm"], meta["slice_thickness_mm"]
    zz, yy, xx = np.meshgrid(np.arange(s) * dz, np.arange(n) * px, np.arange(n) * px, indexing="ij")
    m = np.zeros(shape, bool)
    for l in meta["lesions"]:
        r = l["diameter_mm"] / 2 + margin_px * px
        m |= (zz - l["slice"] * dz) ** 2 + (yy - l["row"] * px) ** 2 + (xx - l["col"] * px) ** 2 <= r * r
    return m


class Study:
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)[:-4]
        self.a = np.load(path, mmap_mode=None)
        with open(path[:-4] + ".json") as f:
            self.meta = json.load(f)
        self.scale = {d: body_scale(self.a[PLANE[d]]) for d in (30.0, 60.0, 90.0)}
        self._texture = {}
        self.mask = lesion_mask(self.meta, self.a.shape[1:])
        s = self.a.shape[1]
        # body voxels per slice, for body-biased crops
        self.body = [np.argwhere(self.a[CLEAN, k] > 0.05 * self.a[CLEAN].max()) for k in range(s)]

    def stack(self, d, k, context=CONTEXT):
        """[context, n, n] of duration d around slice k (edges repeat), normalised."""
        s = self.a.shape[1]
        idx = [min(max(k + j - context // 2, 0), s - 1) for j in range(context)]
        return self.a[PLANE[d], idx] / self.scale[d]

    def texture(self, d):
        if d not in self._texture:
            self._texture[d] = texture(self.a[PLANE[d]])
        return self._texture[d]

    def lesion_departure(self, d):
        """Per lesion of the study: its mean over the lesion's own voxels in
        the d-second frame ÷ the same mean in the noise-free reconstruction,
        minus 1 (how far the frame's noise moves that lesion's SUVmean)."""
        key = ("departure", d)
        if key not in self._texture:
            s, n, _ = self.a.shape[1:]
            px, dz = self.meta["pixel_mm"], self.meta["slice_thickness_mm"]
            out = []
            for l in self.meta["lesions"]:
                r = l["diameter_mm"] / 2
                z0, z1 = max(0, int(l["slice"] - r / dz) - 1), min(s, int(l["slice"] + r / dz) + 2)
                y0, y1 = max(0, int(l["row"] - r / px) - 1), min(n, int(l["row"] + r / px) + 2)
                x0, x1 = max(0, int(l["col"] - r / px) - 1), min(n, int(l["col"] + r / px) + 2)
                zz, yy, xx = np.meshgrid(np.arange(z0, z1) * dz, np.arange(y0, y1) * px, np.arange(x0, x1) * px, indexing="ij")
                m = (zz - l["slice"] * dz) ** 2 + (yy - l["row"] * px) ** 2 + (xx - l["col"] * px) ** 2 <= r * r
                box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
                clean = float(self.a[CLEAN][box][m].mean()) if m.any() else 0.0
                out.append(float(self.a[PLANE[d]][box][m].mean()) / clean - 1.0 if clean > 0 else 0.0)
            self._texture[key] = out
        return self._texture[key]

    def frame_noise_var(self, d):
        """The frame's typical local noise power: the median over body voxels
        (clean > 5 % of its maximum) of (frame − clean)², normalised, averaged
        over NOISE_WINDOW² pixels in-plane (border windows over what they cover)."""
        key = ("noise_var", d)
        if key not in self._texture:
            e2 = ((self.a[PLANE[d]] - self.a[CLEAN]) / self.scale[d]).astype(np.float64) ** 2
            local = box_mean(e2, NOISE_WINDOW)
            body = self.a[CLEAN] > 0.05 * self.a[CLEAN].max()
            self._texture[key] = float(np.median(local[body]))
        return self._texture[key]

    def model_input(self, d, k, context=CONTEXT, textured=False):
        """[context + 1 (+ len(TEXTURE)), n, n]: the slices, the duration
        channel and, for a textured network, one constant channel per
        texture descriptor of the whole frame."""
        x = self.stack(d, k, context)
        chans = [x, np.full((1,) + x.shape[1:], d / 90.0, np.float32)]
        if textured:
            chans.append(np.broadcast_to(self.texture(d)[:, None, None], (len(TEXTURE),) + x.shape[1:]))
        return np.concatenate(chans, 0).astype(np.float32)


def load(folder, limit=None):
    paths = sorted(glob.glob(os.path.join(folder, "*.npy")))
    if limit:
        paths = paths[:limit]
    if not paths:
        raise SystemExit(f"no studies (*.npy) in {folder}: make them with `petlab dataset --out {folder} --split ...`")
    return [Study(p) for p in paths]


class Sampler:
    """Random 2.5D patches. Half the patches are centred near a lesion
    (lesion-aware sampling: small lesions are rare voxels, and the loss
    would otherwise learn to flatten them); the rest at random body voxels.
    Augmentation: flips, transpose, reversed slice order.

    departing q (with threshold t): a share q of the lesion patches is drawn
    from the (study, duration, lesion) triples whose short frame moves the
    lesion's mean by at least t from the noise-free one, either way
    (Study.lesion_departure): at low counts a frame's noise inside a small
    lesion reads as structure, and these cases are otherwise rare."""

    def __init__(self, studies, patch, rng, lesion_fraction=0.5, context=CONTEXT, textured=False, noisy_weight=0.0,
                 departing=0.0, departing_threshold=0.15):
        self.studies, self.patch, self.rng, self.lf, self.context = studies, patch, rng, lesion_fraction, context
        self.textured = textured
        self.dq, self.departing = departing, []
        if departing:
            self.departing = [(i, d, j) for i, st in enumerate(studies) for d in DURATIONS
                              for j, dep in enumerate(st.lesion_departure(d)) if abs(dep) >= departing_threshold]
            if not self.departing:
                raise ValueError(f"no lesion of the training studies departs by {departing_threshold:.0%} in a short frame")
        # noisy_weight k: a study is drawn with probability ∝ exp(k · noise_px)
        # of its 30 s frame (noisier reconstructions more often); 0: uniform
        self.p = None
        if noisy_weight:
            w = np.exp(noisy_weight * np.array([st.texture(30.0)[0] for st in studies], dtype=np.float64))
            self.p = w / w.sum()

    def batch(self, b, frame_var=False):
        """(x, y, m, pet90) for b patches, and with frame_var the frame's
        typical local noise power per patch (Study.frame_noise_var)."""
        P, rng = self.patch, self.rng
        xs, ys, ms, p90, fv = [], [], [], [], []
        for _ in range(b):
            l = None
            if self.departing and rng.random() < self.lf * self.dq:
                i, d, j = self.departing[rng.integers(len(self.departing))]
                st = self.studies[i]
                l = st.meta["lesions"][j]
            else:
                st = self.studies[rng.choice(len(self.studies), p=self.p) if self.p is not None else rng.integers(len(self.studies))]
                d = DURATIONS[rng.integers(len(DURATIONS))]
                les = st.meta["lesions"]
                if les and rng.random() < self.lf:
                    l = les[rng.integers(len(les))]
            s, n = st.a.shape[1], st.a.shape[2]
            if l is not None:
                k = int(np.clip(round(l["slice"] + rng.normal(0, l["diameter_mm"] / 2 / st.meta["slice_thickness_mm"] / 2)), 0, s - 1))
                cy, cx = l["row"] + rng.integers(-P // 3, P // 3 + 1), l["col"] + rng.integers(-P // 3, P // 3 + 1)
            else:
                k = int(rng.integers(s))
                pts = st.body[k]
                cy, cx = pts[rng.integers(len(pts))] if len(pts) else (n // 2, n // 2)
            y0 = int(np.clip(round(cy) - P // 2, 0, n - P))
            x0 = int(np.clip(round(cx) - P // 2, 0, n - P))
            sl = (slice(y0, y0 + P), slice(x0, x0 + P))
            x = st.model_input(d, k, self.context, self.textured)[(slice(None),) + sl]
            y = st.a[CLEAN, k][sl][None] / st.scale[d]
            y90 = st.a[PLANE[90.0], k][sl][None] / st.scale[d]
            m = st.mask[k][sl][None].astype(np.float32)
            if frame_var:
                fv.append(st.frame_noise_var(d))
            if rng.random() < 0.5:
                x[:self.context] = x[:self.context][::-1]
            if rng.random() < 0.5:
                x, y, y90, m = x[:, ::-1], y[:, ::-1], y90[:, ::-1], m[:, ::-1]
            if rng.random() < 0.5:
                x, y, y90, m = x[:, :, ::-1], y[:, :, ::-1], y90[:, :, ::-1], m[:, :, ::-1]
            if rng.random() < 0.5:
                x, y, y90, m = x.transpose(0, 2, 1), y.transpose(0, 2, 1), y90.transpose(0, 2, 1), m.transpose(0, 2, 1)
            xs.append(np.ascontiguousarray(x)); ys.append(np.ascontiguousarray(y)); ms.append(np.ascontiguousarray(m)); p90.append(np.ascontiguousarray(y90))
        out = np.stack(xs), np.stack(ys), np.stack(ms), np.stack(p90)
        return out + (np.array(fv, np.float32),) if frame_var else out


def full_slices(studies, durations=DURATIONS, every=1, context=CONTEXT, textured=False):
    """Whole slices for validation: (x [N,context+1(+texture),n,n], clean, pet90), normalised."""
    xs, cl, p9 = [], [], []
    for st in studies:
        for d in durations:
            for k in range(0, st.a.shape[1], every):
                xs.append(st.model_input(d, k, context, textured))
                cl.append(st.a[CLEAN, k][None] / st.scale[d])
                p9.append(st.a[PLANE[90.0], k][None] / st.scale[d])
    return np.stack(xs), np.stack(cl), np.stack(p9)
