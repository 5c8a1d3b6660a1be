"""Export trained weights to a petrestore model package and check parity.

    python -m petrain.export --params RUN/params.npz --out models/petrestore-unet25d \
        [--train-log RUN/train_log.json] [--metrics EVAL.json]

Writes model.onnx (opset 17: ONNX Runtime 1.31 and tract 0.23 run it),
model.toml (sha256, io, selection, provenance, metrics) and parity/
(input.npy and the JAX output expected.npy, which the Rust tests compare
against tract and ONNX Runtime). Checks JAX vs ONNX Runtime here and fails
if they differ by more than 1e-4 of the output range.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import data, net
from . import sigma as sigma_mod
from .train import load_params

OPSET = 17
BIG = 2**31 - 1


def build(p, width, sigma=None):
    """The ONNX graph of the restoration network `p`; with `sigma` (the
    weights of a σ head, petrain.sigma) also a second output `variance`:
    σ² of PET90 − output per pixel, in the input's normalised units."""
    inits, nodes = [], []
    c, nt = net.context_of(p), net.texture_of(p)
    nt_in = max(nt, net.texture_of(sigma)) if sigma is not None else nt

    def arr(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    image = "input"
    if nt_in:
        # the slices and duration go to the image path; the texture channels
        # (constant maps) become one vector [B, T, 1, 1]
        arr("img_s", np.array([0, 0, 0, 0], np.int64)); arr("img_e", np.array([BIG, c + 1, BIG, BIG], np.int64))
        arr("tex_s", np.array([0, c + 1, 0, 0], np.int64)); arr("tex_e", np.array([BIG, c + 1 + nt_in, BIG, BIG], np.int64))
        nodes += [
            helper.make_node("Slice", ["input", "img_s", "img_e"], ["image"]),
            helper.make_node("Slice", ["input", "tex_s", "tex_e"], ["texture_maps"]),
            helper.make_node("ReduceMean", ["texture_maps"], ["texture"], axes=[2, 3], keepdims=1),
        ]
        image = "image"
    r = unet(p, image, "", arr, nodes)
    arr("xc_s", np.array([0, c // 2, 0, 0], np.int64)); arr("xc_e", np.array([BIG, c // 2 + 1, BIG, BIG], np.int64))
    arr("w_s", np.array([0, c, 0, 0], np.int64)); arr("w_e", np.array([BIG, c + 1, BIG, BIG], np.int64))
    arr("one", np.array(1.0, np.float32))
    nodes += [
        helper.make_node("Slice", ["input", "xc_s", "xc_e"], ["centre"]),
        helper.make_node("Slice", ["input", "w_s", "w_e"], ["w"]),
        helper.make_node("Sub", ["one", "w"], ["one_minus_w"]),
        helper.make_node("Mul", ["one_minus_w", r], ["mixed_residual"]),
        helper.make_node("Add", ["centre", "mixed_residual"], ["output"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1, "height", "width"])]
    if sigma is not None:
        # the head sees the context slices, den = centre + r, den − centre = r,
        # then the duration and texture channels (petrain.sigma.head_input)
        arr("s_ctx_s", np.array([0, 0, 0, 0], np.int64)); arr("s_ctx_e", np.array([BIG, c, BIG, BIG], np.int64))
        arr("s_rest_s", np.array([0, c, 0, 0], np.int64)); arr("s_rest_e", np.array([BIG, c + 1 + nt_in, BIG, BIG], np.int64))
        arr("s_log_start", np.array(sigma_mod.LOG_START, np.float32))
        arr("s_log_floor", np.array(sigma_mod.LOG_FLOOR, np.float32)); arr("s_log_ceil", np.array(sigma_mod.LOG_CEIL, np.float32))
        nodes += [
            helper.make_node("Slice", ["input", "s_ctx_s", "s_ctx_e"], ["s_context"]),
            helper.make_node("Slice", ["input", "s_rest_s", "s_rest_e"], ["s_rest"]),
            helper.make_node("Add", ["centre", r], ["den"]),
            helper.make_node("Concat", ["s_context", "den", r, "s_rest"], ["s_input"], axis=1),
        ]
        kh = net.context_of(sigma)
        arr("s_img_e", np.array([BIG, kh + 1, BIG, BIG], np.int64))
        nodes.append(helper.make_node("Slice", ["s_input", "img_s", "s_img_e"], ["s_image"]))
        h = unet(sigma, "s_image", "s_", arr, nodes)
        nodes += [
            helper.make_node("Add", [h, "s_log_start"], ["s_log_var_raw"]),
            helper.make_node("Clip", ["s_log_var_raw", "s_log_floor", "s_log_ceil"], ["s_log_var"]),
            helper.make_node("Exp", ["s_log_var"], ["variance"]),
        ]
        outputs.append(helper.make_tensor_value_info("variance", TensorProto.FLOAT, ["batch", 1, "height", "width"]))
    graph = helper.make_graph(
        nodes, "petrestore-unet25d",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c + 1 + nt_in, "height", "width"])],
        outputs,
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="petrestore petrain.export")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def unet(p, image, prefix, arr, nodes):
    """Append the nodes of the U-Net `p` on tensor `image` (texture from the
    tensor "texture" where the weights take it); names prefixed by `prefix`.
    Returns the name of its last convolution's output (the residual)."""
    biased = set(net.texture_blocks(net.levels_of(p))) if net.texture_of(p) else set()

    def conv(name, x, relu=True):
        n = prefix + name
        arr(n + "_w", np.asarray(p[name]["w"], np.float32))
        arr(n + "_b", np.asarray(p[name]["b"], np.float32))
        if name in biased:
            t = prefix + "t" + name
            arr(t + "_w", np.asarray(p["t" + name]["w"], np.float32))
            arr(t + "_b", np.asarray(p["t" + name]["b"], np.float32))
            nodes.extend([
                helper.make_node("Conv", [x, n + "_w", n + "_b"], [n + "_c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
                helper.make_node("Conv", ["texture", t + "_w", t + "_b"], [t], kernel_shape=[1, 1]),
                helper.make_node("Add", [n + "_c", t], [n]),
            ])
        else:
            nodes.append(helper.make_node("Conv", [x, n + "_w", n + "_b"], [n], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        if relu:
            nodes.append(helper.make_node("Relu", [n], [n + "_r"]))
            return n + "_r"
        return n

    def conv_t(name, x):
        n = prefix + name
        arr(n + "_w", np.asarray(p[name]["w"], np.float32))
        arr(n + "_b", np.asarray(p[name]["b"], np.float32))
        nodes.append(helper.make_node("ConvTranspose", [x, n + "_w", n + "_b"], [n], kernel_shape=[2, 2], strides=[2, 2]))
        return n

    def pool(name, x):
        nodes.append(helper.make_node("MaxPool", [x], [prefix + name], kernel_shape=[2, 2], strides=[2, 2]))
        return prefix + name

    def cat(name, a, b):
        nodes.append(helper.make_node("Concat", [a, b], [prefix + name], axis=1))
        return prefix + name

    levels = net.levels_of(p)
    enc = [conv("e1b", conv("e1a", image))]
    for l in range(2, levels + 1):
        enc.append(conv(f"e{l}b", conv(f"e{l}a", pool(f"pool{l - 1}", enc[-1]))))
    d = enc[-1]
    for l in range(levels - 1, 0, -1):
        d = conv(f"d{l}b", conv(f"d{l}a", cat(f"cat{l}", conv_t(f"u{l}", d), enc[l - 1])))
    return conv("head", d, relu=False)


def parity_input(rng, context, b=2, h=64, w=48, texture=0):
    """Smooth positive slices like a normalised PET image, two durations,
    and for a textured network constant texture channels in the range the
    simulator's reconstructions give."""
    x = rng.gamma(4.0, 0.25, size=(b, context, h, w)).astype(np.float32)
    k = np.ones(5, np.float32) / 5
    for ax in (2, 3):
        x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), ax, x)
    x[:, :, h // 3:h // 3 + 4, w // 2:w // 2 + 4] += 6.0  # a hot spot
    wch = np.stack([np.full((1, h, w), d / 90.0, np.float32) for d in ([30.0, 60.0] * b)[:b]])
    chans = [x, wch]
    if texture:
        t = np.resize(np.array([-3.0, -2.7, 0.6], np.float32), texture) + rng.uniform(-0.8, 0.8, size=(b, texture)).astype(np.float32)
        chans.append(np.broadcast_to(t[:, :, None, None], (b, texture, h, w)))
    return np.concatenate(chans, 1).astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--id", default="petrestore-unet25d")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--train-log")
    ap.add_argument("--metrics", help="JSON from `petlab eval --json` to record in model.toml")
    ap.add_argument("--purpose", default="research", help="'research' (simulation-trained) or 'test'")
    ap.add_argument("--tta", type=int, choices=[1, 2, 3, 4], default=1,
                    help="io.tta of the package: 2 also runs the slices flipped left-right, 3 and up-down, 4 and both (choose it on the validation split)")
    ap.add_argument("--sigma-head", help="weights of a σ head for these --params (petrain.sigma's sigma_params.npz): "
                    "the graph gets a second output, `variance`, and model.toml an [uncertainty] table that uses it")
    ap.add_argument("--guard", nargs="+", type=float, metavar="FWHM_MM Z [POWER]", action="append", default=[],
                    help="the engines' lesion guard for this package ([guard]: the local mean at FWHM_MM may not move "
                    "from the frame's by more than Z noise SDs, the noise SD growing as the local level to POWER, "
                    "default 1; choose them on the validation grid); repeat it for several scales ([[guard]] tables, "
                    "applied in the order given)")
    a = ap.parse_args(argv)
    for g in a.guard:
        if len(g) not in (2, 3):
            raise SystemExit(f"--guard {' '.join(f'{v:g}' for v in g)}: give FWHM_MM Z and optionally POWER")
        fwhm, z, power = (*g, 1.0)[:3]
        if not (1.0 <= fwhm <= 30.0 and 0.0 < z <= 10.0 and 0.0 <= power <= 1.0):
            raise SystemExit(f"--guard {fwhm:g} {z:g} {power:g}: FWHM must be 1-30 mm, Z above 0 and at most 10, "
                             "POWER 0-1")
    p, width = load_params(a.params)
    sigma = None
    if a.sigma_head:
        sigma, _ = load_params(a.sigma_head)
        if net.context_of(sigma) != net.context_of(p) + 2:
            raise SystemExit(f"--sigma-head {a.sigma_head} was trained for {net.context_of(sigma) - 2} context slices, --params has {net.context_of(p)}")
    model = build(p, width, sigma)
    os.makedirs(os.path.join(a.out, "parity"), exist_ok=True)
    blob = model.SerializeToString(deterministic=True)
    with open(os.path.join(a.out, "model.onnx"), "wb") as f:
        f.write(blob)
    sha = hashlib.sha256(blob).hexdigest()

    # parity: JAX (the trained function) vs ONNX Runtime on the same input
    import onnxruntime as ort
    context = net.context_of(p)
    texture = max(net.texture_of(p), net.texture_of(sigma) if sigma is not None else 0)
    x = parity_input(np.random.default_rng(7), context, texture=texture)
    out, den = sigma_mod.restore(p, x, bool(net.texture_of(p)))
    y_jax = np.asarray(out)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    y_ort = sess.run(["output"], {"input": x})[0]
    span = float(y_jax.max() - y_jax.min())
    diff = float(np.abs(y_ort - y_jax).max())
    np.save(os.path.join(a.out, "parity", "input.npy"), x)
    np.save(os.path.join(a.out, "parity", "expected.npy"), y_jax.astype(np.float32))
    print(f"parity JAX vs ONNX Runtime {ort.__version__}: max |diff| {diff:.3g} over a range of {span:.3g}")
    if not diff <= 1e-4 * max(span, 1e-6):
        raise SystemExit(f"parity failed: ONNX Runtime differs from JAX by {diff} (range {span})")
    if sigma is not None:
        v_jax = np.exp(np.asarray(sigma_mod.log_var(sigma, sigma_mod.head_input(x, den, context))))
        v_ort = sess.run(["variance"], {"input": x})[0]
        rel = float(np.max(np.abs(v_ort - v_jax) / v_jax))
        np.save(os.path.join(a.out, "parity", "expected_variance.npy"), v_jax.astype(np.float32))
        print(f"parity of the variance output, JAX vs ONNX Runtime: max relative difference {rel:.3g}")
        if not rel <= 1e-4:
            raise SystemExit(f"parity failed: the variance output differs from JAX by {rel} (relative)")
    elif os.path.exists(os.path.join(a.out, "parity", "expected_variance.npy")):
        os.remove(os.path.join(a.out, "parity", "expected_variance.npy"))

    log = {}
    if a.train_log:
        with open(a.train_log) as f:
            log = json.load(f)
    metrics = {}
    if a.metrics:
        with open(a.metrics) as f:
            metrics = json.load(f).get("summary", {})
    levels = net.levels_of(p)
    gflop = net.flops_per_pixel(width, context, levels) * 192 * 192 / 1e9
    pad = 2 ** (levels - 1)
    params = net.param_count(p)
    lines = [
        "# Model package: petrestore 2.5D residual U-Net, conditioned on frame duration.",
        "# Trained on SIMULATED studies only (see MODEL_CARD.md); made by models/train (petrain.export).",
        f'id = "{a.id}"',
        f'version = "{a.version}"',
        "# research: trained and evaluated on simulated data only; not validated on patients.",
        f'purpose = "{a.purpose}"',
        f'sha256 = "{sha}"',
        'onnx = "model.onnx"',
        "",
        "[io]",
        f'input = "input"            # float32 [batch, {context + 1 + texture}, height, width]: {context} slices + duration channel'
        + (f" + {texture} texture channels" if texture else ""),
        'output = "output"          # float32 [batch, 1, height, width]: 90 s-equivalent image',
    ] + ([
        'variance = "variance"      # float32 [batch, 1, height, width]: σ² of PET90 − output (normalised units²), the σ head',
    ] if sigma is not None else []) + [
        f"context_slices = {context}         # centre slice ± {context // 2}; edges repeat the first/last slice",
        "batch = 1                  # slices per inference: 1 was 1.4-1.8x faster than 4 on CPU (ORT and tract, 192² and 400², BENCHMARKS.md)",
        '# one extra constant input channel = Actual Frame Duration / 90 s (also the',
        '# weight of the input in the output mix, see MODEL_CARD.md)',
        'condition = "frame_duration_over_90"',
    ] + ([
        "# then one constant channel per descriptor of the frame's own texture, in this order",
        "# (the engines measure them on the whole series; MODEL_CARD.md)",
        "texture = [" + ", ".join(f'"{t}"' for t in data.TEXTURE[:texture]) + "]",
    ] if texture else []) + [
        f"pad_multiple = {pad}           # {levels - 1} 2x2 poolings: height and width padded (edge replicate) to a multiple of {pad}",
        f"tta = {a.tta}                     # test-time augmentation: 1 off, 2 = also run flipped left-right, 3 = and up-down, 4 = and both; outputs averaged",
        "",
        "[normalisation]",
        'kind = "body_mean"',
        "threshold_fraction = 0.05",
        "",
        "[selection]",
        "# trained on 30 s and 60 s frames only",
        "frame_durations_s = [27.0, 66.0]",
        'tracers = ["Fluorodeoxyglucose"]',
        "# in-plane pixel spacing trained on (mm): the randomized reconstructions'",
        "# range (petsim::sites) and the 1.x one at 4.69 mm; outside it a series is skipped",
        "pixel_mm = [2.0, 5.3]",
        "",
        "[provenance]",
        'training_data = "simulated: petlab dataset --split train (ellipse phantom family, seeds 0-9999), physical 2D projection, Poisson, nested frames, OSEM 3x8"',
        f"opset = {OPSET}",
        f"parameters = {params}",
        f"gflop_per_192_slice = {gflop:.3f}",
        f"width = {width}",
        f"levels = {levels}",
    ]
    if log:
        lines += [
            f"train_steps = {log.get('steps', 0)}",
            f"train_minutes = {log.get('train_minutes', 0):.1f}",
            f"best_step = {log.get('best', {}).get('step', 0)}",
            f'train_machine = "{log.get("machine", "")}"',
            f'framework = "jax {log.get("versions", {}).get("jax", "")}, optax {log.get("versions", {}).get("optax", "")}"',
        ]
    if sigma is not None:
        lines += [
            f"sigma_head_width = {int(sigma['e1a']['w'].shape[0])}",
            f"sigma_head_parameters = {net.param_count(sigma)}",
            "",
            "[uncertainty]",
            "# per-voxel σ of PET90 − R: σ² = head[c] · V + noise[c] · N + texture[c] · T, V the network's",
            "# variance output, N and T the analytic terms (docs/QUALITY.md \"Uncertainty\"), c the class",
            "# of R ÷ its body mean; here the σ head alone, as trained (petrain.sigma), no scale fitted after it",
            "window_mm = 10",
            "texture_mm = 6",
            "class_edges = [0.5, 1.5, 3]",
            "noise = [0, 0, 0, 0]",
            "texture = [0, 0, 0, 0]",
            "head = [1, 1, 1, 1]",
            'fitted_on = "the σ head\'s Gaussian likelihood on the training studies (petrain.sigma); no scale fitted after it"',
        ]
    if a.guard:
        lines += [
            "",
            "# the engines' lesion guard (MODEL_CARD.md): after restoration the change x − R, smoothed at fwhm_mm,",
            "# may exceed the frame's own noise at that scale by at most z SDs; the excess is given back to R",
        ]
        for g in a.guard:
            fwhm, z, power = (*g, 1.0)[:3]
            lines += ["[guard]" if len(a.guard) == 1 else "[[guard]]", f"fwhm_mm = {fwhm:g}", f"z = {z:g}"]
            if power != 1.0:
                lines += [f"power = {power:g}"]
    lines += metrics_block(metrics)
    with open(os.path.join(a.out, "model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}/model.onnx ({len(blob)} bytes, sha256 {sha}), model.toml; {params} parameters, {gflop:.2f} GFLOP per 192² slice")


def metrics_block(summary):
    """The [metrics] lines of model.toml from an eval summary: the model's
    own numbers and the references they are judged against."""
    m = {k: v for k, v in summary.items() if "_model" in k or "pet90" in k and "_input" not in k and "_gaussian" not in k or k.startswith("seed_")}
    if not m:
        return []
    lines = ["", "[metrics]", "# held-out test split (lobulated family + NEMA), from `petlab eval`; see EVAL.md"]
    for k, v in sorted(m.items()):
        lines.append(f"{k} = {float(v):.4f}")
    return lines


def update_metrics(model_toml, eval_json):
    """Replace the [metrics] block of an existing model.toml (the package is
    otherwise unchanged): `python -m petrain.export --update-metrics DIR/model.toml EVAL.json`."""
    with open(eval_json) as f:
        summary = json.load(f).get("summary", {})
    with open(model_toml) as f:
        text = f.read()
    head = text.split("\n[metrics]\n")[0].rstrip("\n")
    with open(model_toml, "w") as f:
        f.write(head + "\n" + "\n".join(metrics_block(summary)) + "\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--update-metrics":
        update_metrics(sys.argv[2], sys.argv[3])
    else:
        main()
