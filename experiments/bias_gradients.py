"""Why removed channels' constants matter: the loss gradient on the BN biases of channels whose xi is zero,
beside the weight-decay pull on them, for a prox run's last checkpoint.

    python experiments/bias_gradients.py RUN_DIR [--images 1000]

For each BN with zero-xi channels, on the first N training images (train-mode BN, no augmentation), with the
scales as trained: mean |dL/d bias| over the zero-xi channels and over the others, and the mean
weight_decay * |bias| of the zero-xi channels. If the gradient is far above the decay, training keeps those
biases (and the relu(bias) constants their channels emit) away from zero, and pruning has to fold them.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from palm_jax.train.experiment import load_data, load_trained
from palm_jax.train.state import scale_leaves, sparse_params
from palm_jax.train.step import cross_entropy


def bias_gradients(run_dir: Path, images: int = 1000) -> list[dict]:
    cfg, state, _ = load_trained(run_dir)
    if not cfg.method.keeps_xi:
        raise SystemExit(f"{run_dir}: a prox run is needed (xi), this one is {cfg.method}")
    data = load_data(cfg)
    x = data.preprocess.eval(jnp.asarray(data.train_images[:images]))
    labels = jnp.asarray(data.train_labels[:images])

    def loss(params):
        logits, _ = state.apply_fn(state.variables(params), x, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean()

    grads = jax.grad(loss)(state.params)
    xi = dict(scale_leaves(sparse_params(state, cfg.method)))
    rows = []
    for module, _ in scale_leaves(state.params):
        zero = np.asarray(xi[module]) == 0
        if not zero.any():
            continue
        node_g, node_p = grads, state.params
        for key in module.split("/"):
            node_g, node_p = node_g[key], node_p[key]
        grad, bias = np.abs(np.asarray(node_g["bias"])), np.abs(np.asarray(node_p["bias"]))
        rows.append({
            "bn": module,
            "zero_channels": int(zero.sum()),
            "channels": int(zero.size),
            "grad_zero": float(grad[zero].mean()),
            "grad_kept": float(grad[~zero].mean()) if (~zero).any() else None,
            "decay_zero": float(cfg.weight_decay * bias[zero].mean()),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = bias_gradients(args.run_dir, args.images)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("| BN | zero-xi channels | mean abs dL/dbias, zero-xi | the others | wd * abs bias, zero-xi |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        kept = "-" if r["grad_kept"] is None else f"{r['grad_kept']:.2e}"
        print(f"| {r['bn']} | {r['zero_channels']}/{r['channels']} | {r['grad_zero']:.2e} | {kept} | "
              f"{r['decay_zero']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
