#!/usr/bin/env python3
"""Make the *test* model package `models/test-unet/`: a small 2.5D U-Net-like
ONNX graph with fixed pseudo-random weights, for exercising the engines
(ort, tract) and the model-package checks. It is NOT a trained denoiser:
its output is the centre input slice plus a small learned-looking residual.

    python3 models/tools/make_test_model.py models/test-unet

Deterministic: the same command writes byte-identical files (the test suite
checks that the committed model is what this script makes).
Needs: numpy, onnx (pip).
"""
import hashlib
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17          # ONNX Runtime 1.31 and tract 0.23 both run it
CONTEXT = 5         # adjacent slices in (2.5D), centre slice out
WIDTH = 16          # channels at full resolution


def conv(name, cin, cout, rng, scale=1.0):
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)) * scale).astype(np.float32)
    b = np.zeros(cout, dtype=np.float32)
    inits = [numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(b, name + "_b")]
    return inits


def build():
    rng = np.random.default_rng(20261127)
    inits, nodes = [], []

    def c(name, x, cin, cout, relu=True, scale=1.0):
        inits.extend(conv(name, cin, cout, rng, scale))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        if relu:
            nodes.append(helper.make_node("Relu", [name], [name + "_r"]))
            return name + "_r"
        return name

    e1 = c("enc1a", "input", CONTEXT, WIDTH)
    e1 = c("enc1b", e1, WIDTH, WIDTH)
    nodes.append(helper.make_node("MaxPool", [e1], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]))
    e2 = c("enc2a", "pool1", WIDTH, 2 * WIDTH)
    e2 = c("enc2b", e2, 2 * WIDTH, 2 * WIDTH)
    # Upsample ×2 with a transposed convolution (no Resize: fewer op variants).
    wt = (rng.standard_normal((2 * WIDTH, WIDTH, 2, 2)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(wt, "up_w"))
    nodes.append(helper.make_node("ConvTranspose", [e2, "up_w"], ["up"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Concat", ["up", e1], ["cat"], axis=1))
    d1 = c("dec1a", "cat", 2 * WIDTH, WIDTH)
    d1 = c("dec1b", d1, WIDTH, WIDTH)
    res = c("head", d1, WIDTH, 1, relu=False, scale=0.01)
    # Residual on the centre slice.
    inits.append(numpy_helper.from_array(np.array([0, CONTEXT // 2, 0, 0], dtype=np.int64), "centre_starts"))
    inits.append(numpy_helper.from_array(np.array([2**31 - 1, CONTEXT // 2 + 1, 2**31 - 1, 2**31 - 1], dtype=np.int64), "centre_ends"))
    nodes.append(helper.make_node("Slice", ["input", "centre_starts", "centre_ends"], ["centre"]))
    nodes.append(helper.make_node("Add", ["centre", res], ["output"]))

    graph = helper.make_graph(
        nodes,
        "petrestore-test-unet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", CONTEXT, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="petrestore make_test_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def flops_per_pixel():
    # multiply-adds per output pixel at full resolution (pooled level counts 1/4)
    full = 9 * (CONTEXT * WIDTH + WIDTH * WIDTH + 2 * WIDTH * WIDTH + WIDTH * WIDTH + WIDTH) + 4 * 2 * WIDTH * WIDTH / 4
    half = 9 * (WIDTH * 2 * WIDTH + 4 * WIDTH * WIDTH)
    return 2 * (full + half / 4)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "models/test-unet"
    os.makedirs(out, exist_ok=True)
    data = build().SerializeToString(deterministic=True)
    with open(os.path.join(out, "model.onnx"), "wb") as f:
        f.write(data)
    sha = hashlib.sha256(data).hexdigest()
    gflop = flops_per_pixel() * 192 * 192 / 1e9
    toml = f'''# Model package: petrestore test U-Net (NOT a trained denoiser).
# Made by: python3 models/tools/make_test_model.py {out}
id = "petrestore-test-unet"
version = "0.1.0"
# "test": exercises the engines only; the daemon logs a warning and writes
# "TEST MODEL" into Derivation Description when it is used.
purpose = "test"
sha256 = "{sha}"
onnx = "model.onnx"

[io]
input = "input"            # float32 [batch, context, height, width]
output = "output"          # float32 [batch, 1, height, width]
context_slices = {CONTEXT}         # centre slice ± {CONTEXT // 2}; edges repeat the first/last slice
batch = 4                  # slices per engine call

[normalisation]
# Divide by the mean of the body (voxels above 5 % of the 99.9th percentile),
# restore, multiply back: invertible and quantitative (Bq/ml in, Bq/ml out).
kind = "body_mean"
threshold_fraction = 0.05

[selection]
frame_durations_s = [20.0, 75.0]
tracers = ["Fluorodeoxyglucose"]

[provenance]
training_data = "none: fixed pseudo-random weights (seed 20261127)"
opset = {OPSET}
gflop_per_192_slice = {gflop:.3f}
'''
    with open(os.path.join(out, "model.toml"), "w") as f:
        f.write(toml)
    print(f"wrote {out}/model.onnx ({len(data)} bytes, sha256 {sha}) and {out}/model.toml; {gflop:.2f} GFLOP per 192² slice")


if __name__ == "__main__":
    main()
