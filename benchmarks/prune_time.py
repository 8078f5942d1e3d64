"""Time and exactness of `palm_jax.prune` on the paper's three CIFAR networks, exact and closest fold.

    python benchmarks/prune_time.py                                  # VGG-19, PreResNet-164, DenseNet-40
    python benchmarks/prune_time.py --models vgg19 --out /tmp/p.json

Each network gets NS initial weights, then, from --seed: a random half of every BN's scales set to exactly 0,
the other scales and the running means / variances perturbed, and positive BN biases U(0, 0.1), so that
every removed channel emits a nonzero constant relu(bias) (the case where folding matters). `prune` runs on
a probe of 8 standard-normal 32x32x3 images, once per fold: wall seconds (tracing, walks, slicing, the
report's FLOP count and logit check, with compiles), channels before / after, carrier channels, and the
report's max logit deviation from the unpruned model on the probe. Prints the table last.
"""

import argparse
import time

import common
import numpy as np

MODELS = ("vgg19", "preresnet164", "densenet40")


def build(name: str):
    from palm_jax.models import VGG, DenseNet, PreResNet

    return {"vgg19": lambda: VGG(depth=19), "preresnet164": lambda: PreResNet(depth=164),
            "densenet40": lambda: DenseNet(depth=40)}[name]()


def sparse_variables(model, probe, seed: int) -> dict:
    """NS init, then half of every BN's scales at exactly 0, positive biases, perturbed statistics."""
    import jax
    from flax import traverse_util

    variables = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(probe[:1])
    rng = np.random.default_rng(seed)
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(variables).items()}
    for key, value in flat.items():
        if key[-1] == "scale":
            value *= rng.uniform(0.5, 1.5, value.shape)
            value[rng.random(value.shape) < 0.5] = 0.0
        elif key[-1] == "bias" and key[0] == "params" and (*key[:-1], "scale") in flat:
            value[:] = rng.uniform(0.0, 0.1, value.shape)
        elif key[-1] == "var":
            value[:] = rng.uniform(0.5, 1.5, value.shape)
        elif key[-1] == "mean":
            value[:] = rng.normal(0.0, 0.1, value.shape)
    return traverse_util.unflatten_dict(flat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    from palm_jax import prune

    probe = np.random.default_rng(args.seed).normal(size=(8, 32, 32, 3)).astype(np.float32)
    rows, records = [], []
    for name in args.models:
        model = build(name)
        variables = sparse_variables(model, probe, args.seed)
        for fold in ("exact", "closest"):
            start = time.perf_counter()
            result = prune(model, variables, probe=probe, exact=fold == "exact")
            seconds = time.perf_counter() - start
            r = result.report
            record = {"model": name, "fold": fold, "seconds": round(seconds, 2),
                      "channels_before": r["channels_before"], "channels_after": r["channels_after"],
                      "carrier_channels": r["fold"]["carrier_channels"],
                      "max_logit_deviation": r["max_logit_deviation"]}
            records.append(record)
            rows.append([name, fold, f"{seconds:.1f}", f"{r['channels_before']} -> {r['channels_after']}",
                         r["fold"]["carrier_channels"], f"{r['max_logit_deviation']:.2e}"])
    env = common.environment()
    path = common.write_json({"env": env, "rows": records}, args.out, "prune_time", env)
    print(f"json: {path}")
    common.print_table(["model", "fold", "seconds", "channels", "carriers", "max logit deviation"], rows,
                       f"palm_jax.prune on {env['device_kind']} ({env['date']})")


if __name__ == "__main__":
    main()
