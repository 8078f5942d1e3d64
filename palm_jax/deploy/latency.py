"""Measured inference latency: the jitted eval forward pass of several models, timed alike on one device.

    latency = measure_latency((model, variables), (result.model, result.variables))
    latency == {"device": "cpu", "platform": "cpu", "dtype": "float32",
                "batches": {"1": {"before_ms": ..., "after_ms": ..., "speedup": ..., "repeats": ...},
                            "64": {...}}}      # str keys: the dict survives a JSON round trip unchanged
    print(latency_table(latency))        # a Markdown table for report.md

How it is measured: each model's `apply(variables, x, train=False)` (an NNX module: its call in eval mode) is
compiled ahead of time for every batch size (compilation is never timed) on the default device, with the
variables and a standard-normal input batch already there; each model runs once as a warm-up; then the models
run in rounds, one call each per round, the order reversed every other round, so that noise from other work on
the machine hits every model alike. Each call is timed from dispatch to `block_until_ready()`; the median over
the rounds is reported. Rounds go on until the batch size's share of the time budget is spent, at least
`min_repeats` and at most `max_repeats` of them: one warm-up and `min_repeats` calls per model is the least a
measurement costs.
"""

import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

THROUGHPUT_BATCH = {"cpu": 64}  # per platform; 256 on accelerators
ACCELERATOR_THROUGHPUT_BATCH = 256


def default_batches(platform: str | None = None) -> tuple[int, int]:
    """Batch 1 (latency) and the throughput batch of `platform` (default: the default device's)."""
    platform = platform or jax.devices()[0].platform
    return 1, THROUGHPUT_BATCH.get(platform, ACCELERATOR_THROUGHPUT_BATCH)


def _program(model, variables):
    """(forward(state, x), state): a Linen module's `apply(variables, x, train=False)`, or an NNX module (with
    `variables`, an `nnx.State` or None, applied onto a copy) called in eval mode."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return (lambda variables, x: model.apply(variables, x, train=False)), variables
    copy = nnx.clone(model)
    if variables is not None:
        nnx.update(copy, variables)
    copy.eval()
    graphdef, state = nnx.split(copy)
    return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def _is_module(model) -> bool:
    from flax import nnx

    return hasattr(model, "apply") or isinstance(model, nnx.Module)


def _check(models: Mapping, batches, budget_s, min_repeats, max_repeats) -> None:
    if not models:
        raise ValueError("time_forward: no model to time")
    for name, pair in models.items():
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and _is_module(pair[0])):
            raise ValueError(f"time_forward: {name!r} must be a (flax module, variables) pair (Linen, or NNX "
                             "with an nnx.State or None)")
    if not batches or any(int(b) != b or b < 1 for b in batches):
        raise ValueError(f"time_forward: batches must be positive ints, got {batches}")
    if not budget_s > 0 or not 1 <= min_repeats <= max_repeats:
        raise ValueError("time_forward: need budget_s > 0 and 1 <= min_repeats <= max_repeats, got "
                         f"{budget_s}, {min_repeats}, {max_repeats}")


def time_forward(models: Mapping, batches=None, *, input_shape=(32, 32, 3), budget_s: float = 10.0,
                 min_repeats: int = 3, max_repeats: int = 50, seed: int = 0) -> dict:
    """Median milliseconds of each model's jitted eval forward pass per batch size (see the module docstring).

    Args:
      models: name -> (flax module, variables); `module.apply(variables, x, train=False)` is timed (an NNX
        module: `module(x)` in eval mode, with variables, an nnx.State or None, applied onto a copy).
      batches: batch sizes (default `default_batches()`: 1 and 64 on CPU, 1 and 256 on accelerators).
      input_shape: one example's shape (NHWC without the batch axis); inputs are float32.
      budget_s: seconds of timed rounds over all batch sizes together (warm-up and compilation come on top).
      min_repeats, max_repeats: bounds on the number of rounds per batch size.

    Returns:
      {"device": device kind, "platform": ..., "batches": {str(n): {"ms": {name: median ms}, "repeats": r}}}.
    """
    batches = tuple(default_batches() if batches is None else batches)
    _check(models, batches, budget_s, min_repeats, max_repeats)
    rng = np.random.default_rng(seed)
    device = None
    results = {}
    for n in batches:
        x = jnp.asarray(rng.standard_normal((n, *input_shape), dtype=np.float32))
        device = next(iter(x.devices()))
        calls = {}
        for name, (model, variables) in models.items():
            forward, variables = _program(model, variables)
            variables = jax.device_put(variables, device)
            compiled = jax.jit(forward).lower(variables, x).compile()
            calls[name] = (compiled, variables)
        for fn, v in calls.values():  # the first call of a program is slower
            _timed(fn, v, x)
        samples, order = {name: [] for name in calls}, list(calls)
        start, repeats = time.perf_counter(), 0
        while repeats < max_repeats and (
                repeats < min_repeats or time.perf_counter() - start < budget_s / len(batches)):
            for name in order if repeats % 2 == 0 else reversed(order):
                samples[name].append(_timed(*calls[name], x))
            repeats += 1
        results[str(n)] = {"ms": {name: 1e3 * float(np.median(s)) for name, s in samples.items()},
                           "repeats": repeats}
    return {"device": device.device_kind, "platform": device.platform, "batches": results}


def _timed(compiled, variables, x) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    return time.perf_counter() - start


def measure_latency(before, after, batches=None, **options) -> dict:
    """Latency of the unpruned (`before`) and pruned (`after`) model, each a (flax module, variables) pair.

    Returns {"device", "platform", "dtype", "batches": {str(n): {"before_ms", "after_ms", "speedup",
    "repeats"}}}, JSON-able; speedup = before_ms / after_ms. `options` go to `time_forward` (input_shape,
    budget_s, min_repeats, max_repeats, seed). The dtype is the modules' compute dtype (`dtype` field).
    """
    timed = time_forward({"before": before, "after": after}, batches, **options)
    rows = {}
    for n, entry in timed["batches"].items():
        before_ms, after_ms = entry["ms"]["before"], entry["ms"]["after"]
        rows[n] = {"before_ms": before_ms, "after_ms": after_ms, "speedup": before_ms / after_ms,
                   "repeats": entry["repeats"]}
    dtype = jnp.dtype(getattr(after[0], "dtype", None) or jnp.float32).name
    return {"device": timed["device"], "platform": timed["platform"], "dtype": dtype, "batches": rows}


def add_latency(result, before, latency, input_shape):
    """`palm_jax.prune`'s `latency=` option: `result` (a PruneResult) with `result.report["latency"]`, the
    `measure_latency` of `before` (the unpruned (module, variables)) and the pruned model on inputs of
    `input_shape`, with "seconds" (what measuring took, compilation included); `latency`: False (nothing),
    True (the defaults) or a dict of `measure_latency` options."""
    if latency is False or latency is None:
        return result
    if not (latency is True or isinstance(latency, Mapping)):
        raise ValueError(f"prune: latency must be True, False or a dict of measure_latency options, got "
                         f"{latency!r}")
    options = {"input_shape": tuple(input_shape), **({} if latency is True else latency)}
    start = time.perf_counter()
    measured = measure_latency(before, (result.model, result.variables), **options)
    result.report["latency"] = {**measured, "seconds": round(time.perf_counter() - start, 2)}
    return result


def latency_table(latency: dict) -> str:
    """`measure_latency`'s result as a Markdown table: per batch size, ms and images/s before and after."""
    lines = [
        f"Eval forward pass on {latency['device']} ({latency.get('dtype', 'float32')}, median of repeats):",
        "",
        "| batch | unpruned (ms) | pruned (ms) | speedup | unpruned (images/s) | pruned (images/s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, row in sorted(latency["batches"].items(), key=lambda item: int(item[0])):
        per_s = lambda ms, n=int(n): f"{1e3 * n / ms:,.0f}"
        lines.append(f"| {n} | {row['before_ms']:.2f} | {row['after_ms']:.2f} | {row['speedup']:.2f}x | "
                     f"{per_s(row['before_ms'])} | {per_s(row['after_ms'])} |")
    return "\n".join(lines)
