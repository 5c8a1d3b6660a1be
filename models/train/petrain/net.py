"""The network: a 2.5D residual U-Net conditioned on frame duration.

Input  x: float32 [B, K+1(+T), H, W]: K adjacent slices (K odd, the context;
          centre = index K//2) of the short frame divided by the series'
          body mean, one constant channel w = frame duration / 90 s, and for
          a textured network T constant channels: what the frame says about
          its reconstruction (data.TEXTURE: noise at one and two pixels,
          axial noise correlation). K is fixed by the weights (input
          channels of the first layer − 1), T by the texture layers.
          The texture enters as a learned bias on the first convolution of
          every block (`t<block>`: a 1×1 convolution of the texture vector,
          zero at the start), so the network can change how hard it denoises
          with the reconstruction while the image path stays as it was.
Output:   the 90 s-equivalent image (same scale), built as docs/QUALITY.md derives
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

CONTEXT = 5  # default context (slices); a model's own is context_of(p)
LEVELS = 3  # default levels (two poolings: height and width multiples of 4); a model's own is levels_of(p)


def specs(c, context=CONTEXT, levels=LEVELS):
    """(name, kind, cin, cout, k) in graph order: encoder levels 1..L with
    c·2^(l−1) channels, then up-sampling and decoder levels L−1..1, then the head."""
    ch = [c * 2 ** l for l in range(levels)]
    out = [("e1a", "conv", context + 1, c, 3), ("e1b", "conv", c, c, 3)]
    for l in range(2, levels + 1):
        out += [(f"e{l}a", "conv", ch[l - 2], ch[l - 1], 3), (f"e{l}b", "conv", ch[l - 1], ch[l - 1], 3)]
    for l in range(levels - 1, 0, -1):
        out += [(f"u{l}", "convT", ch[l], ch[l - 1], 2),
                (f"d{l}a", "conv", 2 * ch[l - 1], ch[l - 1], 3), (f"d{l}b", "conv", ch[l - 1], ch[l - 1], 3)]
    return out + [("head", "conv", c, 1, 3)]


def texture_of(p):
    """Texture descriptors the weights take (0: none)."""
    return int(p["te1a"]["w"].shape[1]) if "te1a" in p else 0


def texture_blocks(levels):
    """The convolutions that get a texture bias: the first of every block."""
    return [f"e{l}a" for l in range(1, levels + 1)] + [f"d{l}a" for l in range(levels - 1, 0, -1)]


def add_texture(p, texture):
    """The same function with `texture` descriptor inputs: zero texture
    biases, so the network computes exactly what `p` did until training
    teaches it to use them."""
    if texture_of(p):
        raise ValueError("the weights already take texture descriptors")
    q = dict(p)
    for name in texture_blocks(levels_of(p)):
        co = p[name]["w"].shape[0]
        q["t" + name] = {"w": jnp.zeros((co, texture, 1, 1), jnp.float32), "b": jnp.zeros((co,), jnp.float32)}
    return q


def levels_of(p):
    """Resolution levels of the weights (poolings + 1)."""
    return sum(1 for name in p if name.startswith("e") and name.endswith("a"))


def init(key, c, context=CONTEXT, levels=LEVELS, texture=0):
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be odd, is {context}")
    if levels < 2:
        raise ValueError(f"levels must be at least 2, is {levels}")
    p = {}
    for name, kind, ci, co, k in specs(c, context, levels):
        key, sub = jax.random.split(key)
        if kind == "conv":
            w = jax.random.normal(sub, (co, ci, k, k)) * jnp.sqrt(2.0 / (ci * k * k))
        else:
            w = jax.random.normal(sub, (ci, co, k, k)) * jnp.sqrt(1.0 / ci)
        if name == "head":
            w = w * 0.01
        p[name] = {"w": w.astype(jnp.float32), "b": jnp.zeros((co,), jnp.float32)}
    return add_texture(p, texture) if texture else p


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


def residual(p, x, t=None):
    """The learned residual; `t` [B, T] the texture vector of a textured network."""
    r = jax.nn.relu

    def first(name, h):
        y = conv(p[name], h)
        if t is None:
            return y
        q = p["t" + name]
        return y + (t @ q["w"][:, :, 0, 0].T + q["b"])[:, :, None, None]

    levels = levels_of(p)
    enc = [r(conv(p["e1b"], r(first("e1a", x))))]
    for l in range(2, levels + 1):
        enc.append(r(conv(p[f"e{l}b"], r(first(f"e{l}a", pool(enc[-1]))))))
    d = enc[-1]
    for l in range(levels - 1, 0, -1):
        d = jnp.concatenate([conv_t(p[f"u{l}"], d), enc[l - 1]], axis=1)
        d = r(conv(p[f"d{l}b"], r(first(f"d{l}a", d))))
    return conv(p["head"], d)


def context_of(p):
    """Slices of context the weights were trained with."""
    return int(p["e1a"]["w"].shape[1]) - 1


def expand_context(p, context):
    """The same function with a wider context: the first layer gets zero
    weights for the added outer slices, so the expanded network computes
    exactly what `p` did until training teaches it to use them."""
    old = context_of(p)
    if context < old or (context - old) % 2:
        raise ValueError(f"cannot expand a context of {old} slices to {context}")
    pad = (context - old) // 2
    w = p["e1a"]["w"]
    slices, cond = w[:, :old], w[:, old:]
    zeros = jnp.zeros((w.shape[0], pad) + w.shape[2:], w.dtype)
    q = dict(p)
    q["e1a"] = {"w": jnp.concatenate([zeros, slices, zeros, cond], axis=1), "b": p["e1a"]["b"]}
    return q


def forward(p, x):
    """Returns (out, den): the 90 s-equivalent image and the denoised one."""
    k, nt = context_of(p), texture_of(p)
    if x.shape[1] != k + 1 + nt:
        raise ValueError(f"input has {x.shape[1]} channels, the network takes {k + 1 + nt}")
    xc = x[:, k // 2:k // 2 + 1]
    w = x[:, k:k + 1]
    t = jnp.mean(x[:, k + 1:], axis=(2, 3)) if nt else None
    r = residual(p, x[:, :k + 1], t)
    return xc + (1.0 - w) * r, xc + r


def flops_per_pixel(c, context=CONTEXT, levels=LEVELS):
    """Multiply-adds ×2 per output pixel at full resolution."""
    total = 0.0
    for name, kind, ci, co, k in specs(c, context, levels):
        # e_l and d_l run at level l (1/4^(l−1) of the pixels); u_l produces level l
        l = 1 if name == "head" else int(name[1:-1] if kind == "conv" else name[1:])
        total += 2 * ci * co * k * k / 4 ** (l - 1) / (4 if kind == "convT" else 1)
    return total


def param_count(p):
    return int(sum(v["w"].size + v["b"].size for v in p.values()))
