"""Average the weights of networks fine-tuned from one starting point.

Fine-tunes that start from the same weights stay in one basin of the loss,
so the element-wise mean of their weights is itself a network, often better
than any one of them away from the training data ("model soup", Wortsman et
al. 2022). All inputs must have the same layers, shapes and width:

    python -m petrain.soup --out soup/params.npz A/params.npz B/params.npz [C/params.npz ...]

The result is a params.npz for petrain.export, petrain.sigma and
petrain.train --init, as train.save_params writes it.
"""

import argparse
import os

import numpy as np


def average(paths):
    """The element-wise mean of the weights in `paths` (dict key → array) and their width."""
    if len(paths) < 2:
        raise SystemExit("give at least two params.npz files to average")
    zs = [np.load(p) for p in paths]
    keys = sorted(zs[0].files)
    for p, z in zip(paths[1:], zs[1:], strict=True):
        if sorted(z.files) != keys:
            raise SystemExit(f"{p} has other layers than {paths[0]}: not fine-tunes of one network")
        for k in keys:
            if z[k].shape != zs[0][k].shape:
                raise SystemExit(f"{p}: {k} is {z[k].shape}, {paths[0]} has {zs[0][k].shape}")
    if len({int(z["width"]) for z in zs}) != 1:
        raise SystemExit("the networks have different widths")
    out = {k: np.mean([z[k].astype(np.float64) for z in zs], axis=0).astype(zs[0][k].dtype) for k in keys if k != "width"}
    return out, int(zs[0]["width"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("params", nargs="+", help="params.npz files of fine-tunes from one starting point")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    flat, width = average(a.params)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    np.savez(a.out, width=np.array(width), **flat)
    print(f"wrote {a.out}: the mean of {len(a.params)} networks ({len(flat)} arrays, width {width})")


if __name__ == "__main__":
    main()
