"""The network: a 2.5D residual U-Net conditioned on frame duration.

Input  x: float32 [B, 6, H, W]: five adjacent slices (centre = index 2) of the
          short frame divided by the series' body mean, and one constant
          channel w = frame duration / 90 s.
Output:   the 90 s-equivalent image (same scale), built as DESIGN.md derives
          for nested frames: out = w·x_c + (1 − w)·den, with den = x_c + r(x)
          the network's estimate of the noise-free image. Only the denoiser
          is learned; the mix is fixed by the physics of nesting.

Layers are Conv 3x3 (pad 1) + ReLU, MaxPool 2x2, ConvTranspose 2x2 stride 2,
Concat, Slice, Sub, Mul, Add: the same ops in JAX (here) and ONNX
(export.py), so both compute the same function.
"""
import jax
import jax.numpy as jnp
from jax import lax

CONTEXT = 5
IN_CH = CONTEXT + 1
LEVELS = 3  # two poolings: height and width must be multiples of 4


def specs(c):
    """(name, kind, cin, cout, k) in graph order."""
    return [
        ("e1a", "conv", IN_CH, c, 3), ("e1b", "conv", c, c, 3),
        ("e2a", "conv", c, 2 * c, 3), ("e2b", "conv", 2 * c, 2 * c, 3),
        ("e3a", "conv", 2 * c, 4 * c, 3), ("e3b", "conv", 4 * c, 4 * c, 3),
        ("u2", "convT", 4 * c, 2 * c, 2),
        ("d2a", "conv", 4 * c, 2 * c, 3), ("d2b", "conv", 2 * c, 2 * c, 3),
        ("u1", "convT", 2 * c, c, 2),
        ("d1a", "conv", 2 * c, c, 3), ("d1b", "conv", c, c, 3),
        ("head", "conv", c, 1, 3),
    ]


def init(key, c):
    p = {}
    for name, kind, ci, co, k in specs(c):
        key, sub = jax.random.split(key)
        if kind == "conv":
            w = jax.random.normal(sub, (co, ci, k, k)) * jnp.sqrt(2.0 / (ci * k * k))
        else:
            w = jax.random.normal(sub, (ci, co, k, k)) * jnp.sqrt(1.0 / ci)
        if name == "head":
            w = w * 0.01
        p[name] = {"w": w.astype(jnp.float32), "b": jnp.zeros((co,), jnp.float32)}
    return p


def conv(p, x):
    y = lax.conv_general_dilated(x, p["w"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p["b"][None, :, None, None]


def conv_t(p, x):
    # ONNX ConvTranspose, kernel 2 stride 2: y[o, 2i+a, 2j+b] = Σ_c x[c,i,j]·W[c,o,a,b] + bias
    b, _, h, w = x.shape
    y = jnp.einsum("bchw,coij->bohiwj", x, p["w"]).reshape(b, p["w"].shape[1], 2 * h, 2 * w)
    return y + p["b"][None, :, None, None]


def pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def residual(p, x):
    r = jax.nn.relu
    e1 = r(conv(p["e1b"], r(conv(p["e1a"], x))))
    e2 = r(conv(p["e2b"], r(conv(p["e2a"], pool(e1)))))
    e3 = r(conv(p["e3b"], r(conv(p["e3a"], pool(e2)))))
    d2 = jnp.concatenate([conv_t(p["u2"], e3), e2], axis=1)
    d2 = r(conv(p["d2b"], r(conv(p["d2a"], d2))))
    d1 = jnp.concatenate([conv_t(p["u1"], d2), e1], axis=1)
    d1 = r(conv(p["d1b"], r(conv(p["d1a"], d1))))
    return conv(p["head"], d1)


def forward(p, x):
    """Returns (out, den): the 90 s-equivalent image and the denoised one."""
    xc = x[:, CONTEXT // 2:CONTEXT // 2 + 1]
    w = x[:, CONTEXT:CONTEXT + 1]
    r = residual(p, x)
    return xc + (1.0 - w) * r, xc + r


def flops_per_pixel(c):
    """Multiply-adds ×2 per output pixel at full resolution."""
    total = 0.0
    level = {"e1a": 1, "e1b": 1, "e2a": 4, "e2b": 4, "e3a": 16, "e3b": 16, "u2": 16, "d2a": 4, "d2b": 4, "u1": 4, "d1a": 1, "d1b": 1, "head": 1}
    for name, kind, ci, co, k in specs(c):
        total += 2 * ci * co * k * k / level[name]
    return total


def param_count(p):
    return int(sum(v["w"].size + v["b"].size for v in p.values()))
