"""Inference latency and throughput of the unpruned vs the pruned networks (`palm_jax.deploy.time_forward`).

    python benchmarks/inference_time.py                          # VGG-19, PreResNet-164, DenseNet-40
    python benchmarks/inference_time.py --models vgg19 --dtypes float32 --out /tmp/i.json
    python benchmarks/inference_time.py --quick                  # smoke run: VGG-11 at 1/16 width

Each network gets the random sparse BN scales of benchmarks/prune_time.py (half of every BN's scales exactly
0), then is pruned twice: by Network Slimming's global percentile rule at the published ratio (70% of the
channels for VGG-19, 40% for PreResNet-164 and DenseNet-40: `palm_jax.prune(..., percent=...)`), and by the
exact-zero rule (`palm_jax.prune(...)`: the zero channels only). The jitted eval forward pass of the
unpruned and both pruned models is timed in interleaved rounds on the default device (compilation and warm-up
excluded, median of the rounds; see palm_jax/deploy/latency.py), in float32 and in bfloat16
(`model.clone(dtype=jnp.bfloat16)`, float32 weights), at batch 1 and at the throughput batch (64 on CPU,
256 on accelerators). Prints the table last. `--quick` compiles without XLA's backend optimisations (the
random init alone otherwise takes a minute to compile on a busy CPU): its figures only show that the script
runs.
"""

import argparse
import os
import time

import common
import numpy as np
import prune_time

MODELS = {"vgg19": "vgg", "preresnet164": "resnet", "densenet40": "densenet"}  # -> palm_jax.recipes model
DTYPES = ("float32", "bfloat16")


def pruned_models(name: str, model, seed: int) -> tuple[dict, dict]:
    """{variant: (model, variables)} for the unpruned network and its two prunes, and {variant: facts}."""
    from palm_jax import prune
    from palm_jax.recipes import ns_prune_percent

    probe = np.random.default_rng(seed).normal(size=(8, 32, 32, 3)).astype(np.float32)
    variables = prune_time.sparse_variables(model, probe, seed)
    percent = ns_prune_percent(MODELS.get(name, "vgg"), "cifar10")
    pairs, facts = {"unpruned": (model, variables)}, {}
    for variant, options in ((f"NS {percent:.0f}%", {"percent": percent}), ("zeros", {})):
        start = time.perf_counter()
        result = prune(model, variables, probe=probe, **options)
        r = result.report
        pairs[variant] = (result.model, result.variables)
        facts[variant] = {"params": [r["params_before"], r["params_after"]],
                          "flops": [r["flops_before"], r["flops_after"]],
                          "channels": [r["channels_before"], r["channels_after"]],
                          "prune_seconds": round(time.perf_counter() - start, 1)}
    return pairs, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default: 1 and 64 on CPU, 1 and 256 on accelerators)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed rounds per network and dtype (over its batch sizes)")
    parser.add_argument("--quick", action="store_true", help="smoke run: VGG-11 at 1/16 width, batch 1 and 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if args.quick:  # before jax is imported
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"

    import jax.numpy as jnp

    from palm_jax.deploy import time_forward
    from palm_jax.models import VGG

    if args.quick:
        networks = {"vgg11/16": lambda: VGG(depth=11, widths=common.vgg_widths(11, 0.0625))}
        args.batches, args.budget = args.batches or [1, 8], min(args.budget, 0.5)
    else:
        networks = {name: (lambda name=name: prune_time.build(name)) for name in args.models}
    records, rows = [], []
    for name, build in networks.items():
        pairs, facts = pruned_models(name, build(), args.seed)
        for dtype in args.dtypes:
            cast = {k: (m.clone(dtype=jnp.dtype(dtype)), v) for k, (m, v) in pairs.items()}
            timed = time_forward(cast, args.batches, budget_s=args.budget)
            for batch, entry in timed["batches"].items():
                ms = entry["ms"]
                for variant, fact in facts.items():
                    speedup = ms["unpruned"] / ms[variant]
                    records.append({"model": name, "prune": variant, "dtype": dtype, "batch": int(batch),
                                    "unpruned_ms": ms["unpruned"], "pruned_ms": ms[variant],
                                    "speedup": speedup, "repeats": entry["repeats"], **fact})
                    rows.append([name, variant, dtype, batch, _change(fact["params"]), _change(fact["flops"]),
                                 f"{ms['unpruned']:.2f}", f"{ms[variant]:.2f}", f"{speedup:.2f}x",
                                 f"{1e3 * int(batch) / ms[variant]:,.0f}"])
    env = common.environment()
    path = common.write_json({"env": env, "device": timed["device"], "rows": records}, args.out,
                             "inference_time", env)
    print(f"json: {path}")
    common.print_table(["model", "prune", "dtype", "batch", "params", "FLOPs", "unpruned ms", "pruned ms",
                        "speedup", "pruned images/s"], rows,
                       f"eval forward pass on {timed['device']} ({env['date']})")


def _change(pair) -> str:
    return " -> ".join(f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" for n in pair)


if __name__ == "__main__":
    main()
