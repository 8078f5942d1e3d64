"""`prune` for Linen modules: trace (cached), plan (engine), rebuild by the width protocol, check, report.
An `nnx.Module` goes to the NNX front end (`nnx.py`), which shares the arguments, the cache and the result."""

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from palm_jax.deploy.latency import add_latency
from palm_jax.pruning import engine, flops, widths
from palm_jax.pruning import report as reporting
from palm_jax.utils import first_line, frozen_gc, leaf_path

COLLECTIONS = ("params", "batch_stats")
TOLERANCE = 1e-5  # default largest relative logit deviation of the pruned model from the sparse one
CACHE_SIZE = 4
_CACHE: OrderedDict = OrderedDict()


class PruneResult(NamedTuple):
    """`model` (same class, smaller widths), its `variables` (`params`, `batch_stats`) and the `report`."""

    model: Any
    variables: dict
    report: dict


class Analysed(NamedTuple):
    """What one model and input shape give, whatever the values: cached between `prune` calls."""

    closed: Any
    structure: engine.Structure
    controls: list
    flops: dict
    inline: bool = False  # whether the rebuilt model may be traced with jits inlined (`make_jaxpr`)


def check_arguments(threshold, percent, min_channels, tolerance) -> None:
    if percent is not None and not 0 <= percent < 100:
        raise ValueError(f"prune: percent must be in [0, 100), got {percent}")
    if percent is not None and threshold != 0.0:
        raise ValueError("prune: pass either threshold or percent, not both")
    if not threshold >= 0:
        raise ValueError(f"prune: threshold must be >= 0 (|scale| <= threshold is removed), got {threshold}")
    if min_channels < 1 or int(min_channels) != min_channels:
        raise ValueError(f"prune: min_channels must be an int >= 1 (no layer is emptied), got {min_channels}")
    if not tolerance >= 0:
        raise ValueError(f"prune: tolerance must be >= 0 (a relative logit deviation), got {tolerance}")


def _flatten(variables):
    if not isinstance(variables, Mapping) or any(k not in variables for k in COLLECTIONS):
        raise ValueError(
            "prune: variables must hold 'params' and 'batch_stats' (as returned by model.init, with the "
            "trained params, e.g. {'params': sparse_scales(params, opt_state), 'batch_stats': batch_stats})"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path({k: variables[k] for k in COLLECTIONS})
    paths = [leaf_path(path) for path, _ in flat]
    return paths, [np.asarray(v) for _, v in flat], treedef


def error_line(err: Exception) -> str:
    """An exception as `Type: first line` (for a one-line message that wraps it)."""
    return f"{type(err).__name__}: {first_line(err)[:200]}"


def cached(key, build):
    """`build()`, kept for later calls with the same key (the last CACHE_SIZE keys; unhashable: not kept)."""
    try:
        hash(key)
    except TypeError:  # an unhashable module attribute: no caching
        return build()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def make_jaxpr(forward, *args, inline=False):
    """`jax.make_jaxpr(forward)(*args)`.

    `inline`: first try with jits inlined (`jax.disable_jit()`, this thread only). A rebuilt model has new
    shapes, so every jitted function it reaches (and, in Linen, Flax's shape check of each param, which
    traces the param's initializer) misses JAX's trace caches; inlined, each is traced once without a cache
    entry, about twice as fast. Same computation; same FLOP counts where `flops.inlining_keeps_count` holds
    for the model's own jaxpr. If that trace fails, the plain one runs (and raises what it raises)."""
    if inline:
        try:
            with jax.disable_jit():
                return jax.make_jaxpr(forward)(*args)
        except Exception:  # e.g. a loop on traced values, which disable_jit runs in Python
            pass
    return jax.make_jaxpr(forward)(*args)


def trace(model, treedef, values, probe, inline=False):
    """The closed jaxpr of `model.apply(variables, probe, train=False)` over (leaves, probe) (`inline`: see
    `make_jaxpr`)."""
    return make_jaxpr(lambda leaves, x: model.apply(treedef.unflatten(leaves), x, train=False), values, probe,
                      inline=inline)


def _analyse(model, paths, values, treedef, probe) -> Analysed:
    key = (model, treedef, tuple((v.shape, v.dtype.str) for v in values), probe.shape, probe.dtype.str)
    return cached(key, lambda: _analysed(model, paths, values, treedef, probe))


def _analysed(model, paths, values, treedef, probe) -> Analysed:
    try:
        closed = trace(model, treedef, values, probe)
    except Exception as err:
        raise ValueError(
            f"prune: {type(model).__name__}.apply(variables, probe, train=False) fails on the probe batch of "
            f"shape {tuple(probe.shape)} ({error_line(err)}); pass the variables of this model and probe= a "
            "batch of the input size it was built for (the default probe is one random 32x32x3 image)"
        ) from err
    structure = engine.analyse(paths, values, closed, gathering=lambda name: widths.gathers(model))
    shapes_of = lambda m: widths.abstract_shapes(m, probe, paths)
    controls = widths.resolve(model, structure, shapes_of)
    return Analysed(closed, structure, controls, flops.count(closed, len(values), paths),
                    inline=flops.inlining_keeps_count(closed.jaxpr))


@frozen_gc
def prune(model, variables=None, *, threshold=0.0, percent=None, min_channels=1, probe=None, fold=True,
          exact=True, tolerance=TOLERANCE, latency=False):
    """Remove the channels whose BatchNorm scales are zero (or small) and rebuild a smaller model.

    Args:
      model: a Linen module following the width protocol (`widths` attribute, see `palm_jax.pruning`), or
        any `flax.nnx.Module` (see `palm_jax.pruning.nnx`: no protocol, `probe` required).
      variables: `{"params": ..., "batch_stats": ...}` of a Linen model; for an NNX module None (its own
        state) or an `nnx.State` (whole or partial, e.g. the sparse params) written into a copy first.
      threshold: remove channels with |scale| <= threshold (default: exactly zero).
      percent: instead, Network Slimming's global rule: remove |scale| <= the value at index
        floor(n * percent / 100) of all n BN scales sorted together.
      min_channels: keep at least this many channels (the largest-|scale| ones) in every conv and gather.
      probe: an input batch (NHWC) for tracing and for the exactness check; default (Linen only) one
        standard normal 32x32x3 image.
      fold: fold the constants that removed channels emit into biases / BN means (False: only slice).
      exact: where a removed channel's constant cannot be folded exactly (zero padding, a padded pool, a
        nonlinearity), keep one constant input channel of the conv concerned as a carrier for the others
        (report["fold"]["carriers"]), so that the pruned model computes what the model with those scales at
        zero computes. False: fold the closest per-channel constant there instead (approximate).
      tolerance: with fold and exact, the largest relative deviation (max |pruned - sparse| / max |sparse|
        over the probe's logits, evaluated in float64) accepted; above it `prune` raises ValueError
        instead of returning a different model.
      latency: True: time the jitted eval forward pass of the given and the pruned model on this device into
        report["latency"] (`palm_jax.deploy.measure_latency`: batch 1 and the throughput batch, median ms,
        speedup); a dict: measure_latency's options (batches, budget_s, ...). Default False (no timing).

    Returns:
      PruneResult(model, variables, report).
    """
    from flax import nnx

    if isinstance(model, nnx.Module):
        from palm_jax.pruning import nnx as nnx_front

        return nnx_front.prune(model, variables, threshold=threshold, percent=percent,
                               min_channels=min_channels, probe=probe, fold=fold, exact=exact,
                               tolerance=tolerance, latency=latency)
    check_arguments(threshold, percent, min_channels, tolerance)
    widths.model_widths(model)  # fail early on a model outside the width protocol
    if probe is None:
        probe = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    probe = np.asarray(probe)
    clock = time.perf_counter()
    paths, values, treedef = _flatten(variables)
    analysed = _analyse(model, paths, values, treedef, probe)
    seconds = {"trace": time.perf_counter() - clock}
    plan = analysed.structure.plan(values, {k for c in analysed.controls for k in c}, threshold=threshold,
                                   percent=percent, min_channels=min_channels, fold=fold, exact=exact)
    seconds.update(plan.seconds)
    clock = time.perf_counter()
    changes = {"widths": widths.kept_widths(model, analysed.controls, plan)}
    if widths.gathers(model):
        changes["selections"] = widths.selections(model, analysed.structure, plan)
    pruned = model.clone(**changes)
    try:
        pruned_closed = trace(pruned, treedef, plan.values, probe, inline=analysed.inline)
    except Exception as err:
        raise widths.protocol_error(
            model, f"the pruned model {type(model).__name__}({', '.join(f'{k}=...' for k in changes)}) does "
                   f"not take the sliced variables ({error_line(err)})") from err
    check = reporting.check(analysed.closed, values, plan, pruned_closed, probe)
    seconds["check"] = time.perf_counter() - clock
    if fold and exact and check["relative_deviation"] > tolerance:
        where = reporting.first_difference(model, pruned, treedef.unflatten(plan.reference),
                                           treedef.unflatten(plan.values), plan, probe, tolerance)
        raise ValueError(reporting.refusal(type(model).__name__, plan, check, tolerance, where))
    report = reporting.summary(
        plan, analysed.structure, [kernels[0] for kernels in analysed.controls], probe, check,
        flops_before=analysed.flops, flops_after=flops.count(pruned_closed, len(values), paths),
        percent=percent, min_channels=int(min_channels), tolerance=float(tolerance), seconds=seconds,
    )
    new_variables = treedef.unflatten([jax.device_put(v) for v in plan.values])  # (no per-shape compile)
    result = PruneResult(pruned, new_variables, report)
    return add_latency(result, (model, variables), latency, probe.shape[1:])
