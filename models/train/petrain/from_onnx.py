"""Rebuild training weights (params.npz) from a shipped model package, to warm-start training.

    python -m petrain.from_onnx --package ../petrestore-unet25d --out RUN/params.npz
    python -m petrain.train ... --init RUN/params.npz --width W --context K

A package holds model.onnx but not the weights it was exported from.
export.py writes every layer's weight and bias unchanged as initializers
`<layer>_w` and `<layer>_b`, in the layouts net.py uses (Conv OIHW,
ConvTranspose [in, out, 2, 2]; nothing is transposed or folded), so they are
read back as they are; width, context and levels come from their shapes.
The graph must be exactly the one export.build makes from those weights
(nodes, attributes, constants, opset), else this stops.

Checks, all printed, before anything is written to --out: model.onnx is the
file model.toml's sha256 names, and width, levels and context match it; the
weights, saved by train.save_params and read back by load_params, have the
keys, shapes and dtypes of net.init's; JAX on them reproduces
parity/expected.npy (export.py's JAX output `out` for parity/input.npy;
test-time augmentation, io.tta, is done by the Rust engines and is not in
the graph) within 1e-4 of its range; and export.py, run on them into a
temporary folder, writes a model.onnx that gives the shipped one's output
under ONNX Runtime within 1e-5 of its range.
"""
import argparse
import hashlib
import os
import shutil
import tempfile
import tomllib

import jax
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import export, net
from . import sigma as sigma_mod
from .train import load_params, save_params


def fail(msg):
    raise SystemExit(f"from_onnx: {msg}")


def rebuild(model):
    """(params, width, sigma) from the graph's initializers, sigma the σ
    head's weights (None without one), after checking the graph is the one
    export.build makes from them."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    p, width = weights(inits, "")
    sigma = weights(inits, "s_")[0] if "s_e1a_w" in inits else None
    want = export.build(p, width, sigma)
    opsets = [[(o.domain, o.version) for o in m.opset_import] for m in (model, want)]
    if opsets[0] != opsets[1]:
        fail(f"opsets (domain, version) {opsets[0]} are not export.py's {opsets[1]}")
    g, h = model.graph, want.graph
    for what in ("input", "output", "initializer"):
        mine, theirs = ({v.name: v for v in getattr(x, what)} for x in (g, h))
        odd = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if odd or [v.name for v in getattr(g, what)] != [v.name for v in getattr(h, what)]:
            fail(f"graph {what}s differ from export.py's (names, order, types, shapes or values): {odd or 'order'}")
    if len(g.node) != len(h.node):
        fail(f"{len(g.node)} nodes, export.py makes {len(h.node)}")
    for i, (m, n) in enumerate(zip(g.node, h.node, strict=False)):
        if m != n:
            fail(f"node {i} is {helper.printable_node(m)}, export.py makes {helper.printable_node(n)}")
    return p, width, sigma


def weights(all_inits, prefix):
    """One U-Net's (params, width) from the initializers named `prefix` + layer."""
    inits = {k[len(prefix):]: v for k, v in all_inits.items() if k.startswith(prefix) and (prefix or not k.startswith("s_"))}
    if "e1a_w" not in inits or inits["e1a_w"].ndim != 4:
        fail(f"no 4-D initializer {prefix}e1a_w (first convolution): not a petrain.export graph (initializers {sorted(all_inits)})")
    width, context = int(inits["e1a_w"].shape[0]), int(inits["e1a_w"].shape[1]) - 1
    levels = sum(1 for name in inits if name.startswith("e") and name.endswith("a_w"))
    if context < 1 or context % 2 == 0 or levels < 2:
        fail(f"e1a_w {inits['e1a_w'].shape} and {levels} encoder levels are not a petrain network (odd context, 2+ levels)")
    p = {}
    for name, kind, ci, co, k in net.specs(width, context, levels):
        shape = (co, ci, k, k) if kind == "conv" else (ci, co, k, k)
        for t, want in (("w", shape), ("b", (co,))):
            a = inits.get(f"{name}_{t}")
            if a is None or a.shape != want or a.dtype != np.float32:
                got = "missing" if a is None else f"{a.dtype} {a.shape}"
                fail(f"initializer {prefix}{name}_{t} is {got}, a width-{width} context-{context} {levels}-level network needs float32 {want}")
        p[name] = {"w": inits[f"{name}_w"], "b": inits[f"{name}_b"]}
    nt = int(inits["te1a_w"].shape[1]) if "te1a_w" in inits else 0
    for name in net.texture_blocks(levels) if nt else []:
        co = p[name]["w"].shape[0]
        for t, want in (("w", (co, nt, 1, 1)), ("b", (co,))):
            a = inits.get(f"t{name}_{t}")
            if a is None or a.shape != want or a.dtype != np.float32:
                fail(f"initializer {prefix}t{name}_{t} is {'missing' if a is None else f'{a.dtype} {a.shape}'}, a network with {nt} texture inputs needs float32 {want}")
        p["t" + name] = {"w": inits[f"t{name}_w"], "b": inits[f"t{name}_b"]}
    return p, width


def run_onnx(blob, x):
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", required=True, help="model package folder (model.toml, model.onnx, parity/)")
    ap.add_argument("--out", required=True, help="params.npz to write (train.py --init, export.py --params)")
    a = ap.parse_args(argv)
    with open(os.path.join(a.package, "model.toml"), "rb") as f:
        toml = tomllib.load(f)
    with open(os.path.join(a.package, toml["onnx"]), "rb") as f:
        blob = f.read()
    sha = hashlib.sha256(blob).hexdigest()
    if sha != toml["sha256"]:
        fail(f"{toml['onnx']} has sha256 {sha}, model.toml names {toml['sha256']}")
    p, width, sigma = rebuild(onnx.load_from_string(blob))
    context, levels = net.context_of(p), net.levels_of(p)
    shape = {"width": width, "levels": levels, "context_slices": context}
    stated = {"width": toml["provenance"]["width"], "levels": toml["provenance"]["levels"], "context_slices": toml["io"]["context_slices"]}
    if shape != stated:
        fail(f"the graph's weights are {shape}, model.toml says {stated}")
    print(f"{a.package}: {toml['id']} {toml['version']}, sha256 as in model.toml; graph is export.py's for "
          f"width {width}, context {context}, {levels} levels ({net.param_count(p)} parameters)")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "params.npz")
        save_params(path, p, width)
        q, w = load_params(path)
        ref = net.init(jax.random.PRNGKey(0), width, context, levels, net.texture_of(p))
        layout = lambda d: {k: {t: (v[t].shape, v[t].dtype) for t in ("w", "b")} for k, v in d.items()}
        if w != width or layout(q) != layout(ref):
            fail(f"load_params gives width {w} and {layout(q)}, net.init gives width {width} and {layout(ref)}")
        print(f"params.npz: {len(q)} layers, keys, shapes and dtypes as net.init's; width {w}")

        x = np.load(os.path.join(a.package, "parity", "input.npy"))
        expected = np.load(os.path.join(a.package, "parity", "expected.npy"))
        y = np.asarray(sigma_mod.restore(q, x, bool(net.texture_of(q)))[0])
        if y.shape != expected.shape:
            fail(f"JAX output {y.shape}, parity/expected.npy is {expected.shape}")
        span = float(expected.max() - expected.min())
        diff = float(np.abs(y - expected).max())
        print(f"JAX (rebuilt weights) vs parity/expected.npy: max |diff| {diff:.3g} over a range of {span:.3g} "
              f"({diff / span:.2g} of it; limit 1e-4)")
        if not diff <= 1e-4 * max(span, 1e-6):
            fail(f"JAX on the rebuilt weights differs from parity/expected.npy by {diff} (range {span})")

        pkg = os.path.join(tmp, "pkg")
        head_path = os.path.join(tmp, "sigma_params.npz")
        if sigma is not None:
            save_params(head_path, sigma, int(sigma["e1a"]["w"].shape[0]))
        export.main(["--params", path, "--out", pkg] + (["--sigma-head", head_path] if sigma is not None else []))
        with open(os.path.join(pkg, "model.onnx"), "rb") as f:
            blob2 = f.read()
        y0, y1 = run_onnx(blob, x), run_onnx(blob2, x)
        span0 = float(y0.max() - y0.min())
        diff = float(np.abs(y1 - y0).max())
        same = "byte-identical" if blob2 == blob else "not byte-identical"
        print(f"re-exported model.onnx ({same}) vs the shipped one, ONNX Runtime {ort.__version__}: "
              f"max |diff| {diff:.3g} over a range of {span0:.3g} (limit 1e-5 of it)")
        if not diff <= 1e-5 * max(span0, 1e-6):
            fail(f"the re-exported graph differs from the shipped one by {diff} (range {span0})")
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        shutil.copyfile(path, a.out)
        if sigma is not None:
            head_out = os.path.join(os.path.dirname(os.path.abspath(a.out)), "sigma_params.npz")
            shutil.copyfile(head_path, head_out)
            print(f"wrote {head_out}: the σ head (petrain.sigma --head, petrain.export --sigma-head)")
    print(f"wrote {a.out}: warm-start with python -m petrain.train --init {a.out} --width {width} "
          f"--context {context} --levels {levels} ...")


if __name__ == "__main__":
    main()
