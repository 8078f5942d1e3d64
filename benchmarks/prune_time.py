"""Time, exactness and size of `palm_jax.prune` on the paper's three CIFAR networks, against Network Slimming.

    python benchmarks/prune_time.py                                  # VGG-19, PreResNet-164, DenseNet-40
    python benchmarks/prune_time.py --models vgg19 --repeats 3 --out /tmp/p.json

Each network gets NS initial weights, then, from a seed: a random half of every BN's scales set to exactly
0, the other scales and the running means / variances perturbed, and positive BN biases U(0, 0.1), so that
every removed channel emits a nonzero constant relu(bias) (the case where folding needs carriers;
--bias-sign -1 makes them emit 0). `prune`
runs with its defaults (exact folding, the float64 exactness check on a one-image probe): a first call
(cold: tracing the model, analysing it, resolving its widths), then --repeats calls on masks from other
seeds (warm: the trace is cached per model and input shape, the pruned model is new each time); the table
gives the cold seconds, the median warm seconds (and CPU seconds of the process, all threads: steadier than
wall time on a shared machine) and the median warm split into trace / decide / fold /
slice / check (the report's `seconds`), conv channels, carriers and the relative logit deviation from the
sparse model. The closest-constant fold (`exact=False`) runs once for comparison. The script also runs
against an older palm_jax (`PYTHONPATH=/path/to/main`: totals and the absolute deviation only).

The NS table applies Network Slimming's own rule to the same masks (`resprune.py`, `denseprune.py` of the
NS code, re-implemented here without torch): each BN keeps its nonzero channels (cfg), the BN before a
channel_selection keeps its full width, PreResNet's conv3 / downsample and DenseNet's growth convs keep
their outputs, pruned channels' biases are zeroed (so NS's model is not the sparse one). Parameters exclude
NS's channel_selection index vectors; FLOPs are NS's compute_flops convention (the report's flops_ns_*).
"""

import argparse
import statistics
import time

import common
import numpy as np

MODELS = ("vgg19", "preresnet164", "densenet40")
SPLIT = ("trace", "decide", "fold", "slice", "check")


def build(name: str):
    from palm_jax.models import VGG, DenseNet, PreResNet

    return {"vgg19": lambda: VGG(depth=19), "preresnet164": lambda: PreResNet(depth=164),
            "densenet40": lambda: DenseNet(depth=40)}[name]()


_INITS = {}


def sparse_variables(model, probe, seed: int, bias_sign: float = 1.0) -> dict:
    """NS init, then half of every BN's scales at exactly 0, biases of sign `bias_sign`, perturbed
    statistics."""
    import jax
    from flax import traverse_util

    if model not in _INITS:  # one compiled init per model, whatever the seed
        _INITS[model] = jax.jit(lambda key, x: model.init(key, x, train=False))
    variables = _INITS[model](jax.random.key(seed), probe[:1])
    rng = np.random.default_rng(seed)
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(variables).items()}
    for key, value in flat.items():
        if key[-1] == "scale":
            value *= rng.uniform(0.5, 1.5, value.shape)
            value[rng.random(value.shape) < 0.5] = 0.0
        elif key[-1] == "bias" and key[0] == "params" and (*key[:-1], "scale") in flat:
            value[:] = bias_sign * rng.uniform(0.0, 0.1, value.shape)
        elif key[-1] == "var":
            value[:] = rng.uniform(0.5, 1.5, value.shape)
        elif key[-1] == "mean":
            value[:] = rng.normal(0.0, 0.1, value.shape)
    return traverse_util.unflatten_dict(flat)


# ---- Network Slimming's rule on the same masks (cfg and the pruned model's sizes, as resprune / denseprune)

def _kept(variables, names) -> list[int]:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables["params"])
    return [int(np.sum(np.asarray(flat[(*n.split("/"), "scale")]) != 0)) for n in names]


def ns_preresnet(model, variables) -> dict:
    """NS's resnet(cfg): per block bn1 (full width, then channel_selection), conv1 cfg0 -> cfg1 (1x1),
    bn2, conv2 cfg1 -> cfg2 (3x3, stride), bn3, conv3 cfg2 -> 4 planes, downsample (full); bn (full), fc."""
    n = (model.depth - 2) // 9
    names = [f"stage{s + 1}_block{b}/bn{i}" for s in range(3) for b in range(n) for i in (1, 2, 3)]
    cfg = _kept(variables, names + ["bn_final"])
    params, flops, bn, size, inplanes = 27 * 16, 2 * 27 * 16 * 32 * 32, 0, 32, 16
    for s, planes in enumerate((16, 32, 64)):
        for b in range(n):
            c1, c2, c3 = cfg[3 * (s * n + b): 3 * (s * n + b) + 3]
            stride = 2 if s > 0 and b == 0 else 1
            out = size // stride
            params += 2 * inplanes + c1 * c2 + 2 * c2 + 9 * c2 * c3 + 2 * c3 + c3 * 4 * planes
            flops += (2 * inplanes + c1 + 2 * c1 * c2 + 3 * c2) * size * size  # bn1, relu, conv1, bn2 + relu
            flops += (2 * 9 * c2 * c3 + 3 * c3 + 2 * c3 * 4 * planes) * out * out  # conv2, bn3 + relu, conv3
            if b == 0:
                params += inplanes * 4 * planes
                flops += 2 * inplanes * 4 * planes * out * out
            bn += inplanes + c2 + c3
            inplanes, size = 4 * planes, out
    params += 2 * inplanes + cfg[-1] * 10 + 10
    flops += (2 * inplanes + cfg[-1]) * size * size + cfg[-1] * size * size + 2 * cfg[-1] * 10 + 10
    return {"bn_channels_cfg": sum(cfg), "bn_channels": bn + inplanes, "params": params, "flops_ns": flops}


def ns_densenet(model, variables) -> dict:
    """NS's densenet(cfg): per layer bn (full width, then channel_selection), conv cfg -> growth (3x3); per
    transition bn (full), conv cfg -> inplanes (1x1), 2x2 average pool; bn (full), fc."""
    n, growth = (model.depth - 4) // 3, model.growth_rate
    names = [f"block{k + 1}_layer{i}/bn" for k in range(3) for i in range(n)]
    names = [*names[:n], "transition1/bn", *names[n:2 * n], "transition2/bn", *names[2 * n:], "bn_final"]
    kept = _kept(variables, names)
    cfg = iter(kept)
    inplanes, size = 2 * growth, 32
    params, flops, bn = 27 * inplanes, 2 * 27 * inplanes * size * size, 0
    for k in range(3):
        for _ in range(n):
            c = next(cfg)
            params += 2 * inplanes + 9 * c * growth
            flops += (2 * inplanes + c + 2 * 9 * c * growth) * size * size
            bn, inplanes = bn + inplanes, inplanes + growth
        c = next(cfg)
        if k < 2:
            params += 2 * inplanes + c * inplanes
            flops += (2 * inplanes + c + 2 * c * inplanes) * size * size + 4 * inplanes * (size // 2) ** 2
            bn, size = bn + inplanes, size // 2
    params += 2 * inplanes + c * 10 + 10
    flops += (2 * inplanes + c) * size * size + c * size * size + 2 * c * 10 + 10
    return {"bn_channels_cfg": sum(kept), "bn_channels": bn + inplanes, "params": params, "flops_ns": flops}


def deviation(report) -> float:
    """The relative logit deviation from the sparse model (older palm_jax: the absolute one)."""
    return report["check"]["relative_deviation"] if "check" in report else report["max_logit_deviation"]


def timed_prune(model, variables, probe, **kwargs):
    """(result, wall seconds, CPU seconds of the process: all its threads)."""
    from palm_jax import prune

    start, cpu = time.perf_counter(), time.process_time()
    result = prune(model, variables, probe=probe, **kwargs)
    return result, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="warm calls (each on another mask)")
    parser.add_argument("--bias-sign", type=float, default=1.0, choices=[1.0, -1.0],
                        help="-1: negative BN biases, so removed channels emit 0 and need no carrier")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    probe = np.random.default_rng(args.seed).normal(size=(1, 32, 32, 3)).astype(np.float32)
    rows, ns_rows, records = [], [], []
    for name in args.models:
        model = build(name)
        variables = sparse_variables(model, probe, args.seed, args.bias_sign)
        result, cold, _ = timed_prune(model, variables, probe)
        warm = [timed_prune(model, sparse_variables(model, probe, args.seed + 1 + i, args.bias_sign), probe)
                for i in range(args.repeats)]
        seconds, cpu = statistics.median(s for _, s, _ in warm), statistics.median(c for *_, c in warm)
        close, *_ = timed_prune(model, variables, probe, exact=False)
        r, c = result.report, close.report
        split = {k: statistics.median(w.report["seconds"][k] for w, *_ in warm)
                 for k in SPLIT} if "seconds" in r else {}  # (older palm_jax: totals only)
        record = {"model": name, "cold_seconds": round(cold, 2), "warm_seconds": round(seconds, 2),
                  "warm_cpu_seconds": round(cpu, 2),
                  "warm_split": {k: round(v, 3) for k, v in split.items()},
                  "channels": [r["channels_before"], r["channels_after"]],
                  "carrier_channels": r["fold"]["carrier_channels"],
                  "deviation": deviation(r), "closest_deviation": deviation(c)}
        for key in ("bn_channels", "params", "flops", "flops_ns"):
            if f"{key}_before" in r:
                record[key] = [r[f"{key}_before"], r[f"{key}_after"], c[f"{key}_after"]]
        parts = " / ".join(f"{split[k]:.2f}" for k in split) or "-"
        rows.append([name, f"{cold:.1f}", f"{seconds:.2f}", f"{cpu:.2f}", parts,
                     f"{r['channels_before']} -> {r['channels_after']}", r["fold"]["carrier_channels"],
                     f"{record['deviation']:.1e}", f"{record['closest_deviation']:.1e}"])
        if name != "vgg19" and "flops_ns" in record:
            ns = (ns_preresnet if name == "preresnet164" else ns_densenet)(model, variables)
            record["ns"] = ns
            ns_rows.append([name, r["bn_channels_before"], f"{ns['bn_channels_cfg']} ({ns['bn_channels']})",
                            f"{r['bn_channels_after']} ({r['fold']['carrier_channels']}) / "
                            f"{c['bn_channels_after']}",
                            f"{r['params_before']:,}", f"{ns['params']:,}",
                            f"{r['params_after']:,} / {c['params_after']:,}", f"{r['flops_ns_before']:.3e}",
                            f"{ns['flops_ns']:.3e}",
                            f"{r['flops_ns_after']:.3e} / {c['flops_ns_after']:.3e}"])
        records.append(record)
    env = common.environment()
    path = common.write_json({"env": env, "rows": records}, args.out, "prune_time", env)
    print(f"json: {path}")
    common.print_table(
        ["model", "cold s", "warm s (median)", "warm CPU s", "warm " + " / ".join(SPLIT), "conv channels",
         "carriers", "deviation", "closest fold"], rows,
        f"palm_jax.prune on {env['device_kind']} ({env['date']}), half of every BN's scales 0")
    if ns_rows:
        common.print_table(
            ["model", "BN channels", "NS: kept (in model)", "palm_jax exact (carriers) / closest", "params",
             "NS params", "palm_jax exact / closest", "FLOPs (NS conv.)", "NS FLOPs",
             "palm_jax exact / closest"],
            ns_rows, "Network Slimming's rule vs palm_jax on the same masks (params and FLOPs left)")


if __name__ == "__main__":
    main()
