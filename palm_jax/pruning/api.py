"""`prune`: trace, decide, fold, slice, rebuild, check and report."""

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from palm_jax.pruning import report as reporting
from palm_jax.pruning import slicing, widths
from palm_jax.pruning.graph import ChannelGraph, Leaf
from palm_jax.pruning.trace import Walker

COLLECTIONS = ("params", "batch_stats")
MAX_WALKS = 8


class PruneResult(NamedTuple):
    """`model` (same class, smaller widths), its `variables` (`params`, `batch_stats`) and the `report`."""

    model: Any
    variables: dict
    report: dict


def _check_arguments(threshold, percent, min_channels) -> None:
    if percent is not None and not 0 <= percent < 100:
        raise ValueError(f"prune: percent must be in [0, 100), got {percent}")
    if percent is not None and threshold != 0.0:
        raise ValueError("prune: pass either threshold or percent, not both")
    if not threshold >= 0:
        raise ValueError(f"prune: threshold must be >= 0 (|scale| <= threshold is removed), got {threshold}")
    if min_channels < 1 or int(min_channels) != min_channels:
        raise ValueError(f"prune: min_channels must be an int >= 1 (no layer is emptied), got {min_channels}")


def _flatten(model, variables, probe):
    if not isinstance(variables, Mapping) or any(k not in variables for k in COLLECTIONS):
        raise ValueError(
            "prune: variables must hold 'params' and 'batch_stats' (as returned by model.init, with the "
            "trained params, e.g. {'params': sparse_scales(params, opt_state), 'batch_stats': batch_stats})"
        )
    flat = jax.tree_util.tree_flatten_with_path({k: variables[k] for k in COLLECTIONS})
    paths = [tuple(str(getattr(p, "key", p)) for p in path) for path, _ in flat[0]]
    values = [np.asarray(v) for _, v in flat[0]]
    try:
        shapes = widths.abstract_shapes(model, probe, paths)
    except widths.LeafMismatch:
        raise
    except Exception as err:
        raise ValueError(
            f"prune: {type(model).__name__}.init fails on the probe batch of shape {probe.shape} "
            f"({type(err).__name__}); pass probe= a batch of inputs the model accepts"
        ) from err
    for path, shape, value in zip(paths, shapes, values, strict=True):
        if tuple(shape) != value.shape:
            raise ValueError(f"prune: {'/'.join(path)} has shape {value.shape} but the model creates "
                             f"{tuple(shape)}; pass the variables of this model")
    return paths, values, flat[1]


def carrier_classes(carriers: dict | None) -> set:
    """The class roots of the carriers (kernel leaf -> (input position, class root))."""
    return {root for _, root in (carriers or {}).values()}


def prune(
    model, variables, *, threshold=0.0, percent=None, min_channels=1, probe=None, fold=True, exact=True
):
    """Remove the channels whose BatchNorm scales are zero (or small) and rebuild a smaller model.

    Args:
      model: a Flax module following the width protocol (`widths` attribute, see `palm_jax.pruning`).
      variables: `{"params": ..., "batch_stats": ...}` of the model.
      threshold: remove channels with |scale| <= threshold (default: exactly zero).
      percent: instead, Network Slimming's global rule: remove |scale| <= the value at index
        floor(n * percent / 100) of all n BN scales sorted together.
      min_channels: keep at least this many channels (the largest-|scale| ones) in every conv.
      probe: an input batch (NHWC) for tracing and for measuring the logit deviation; default 8 standard
        normal 32x32x3 images.
      fold: fold the constants that removed channels emit into biases / BN means (False: only slice).
      exact: where a removed channel's constant is read through zero padding, keep one removed channel of
        that input, its scale 0, as a constant carrier for the others (report["fold"]["carriers"]), so that
        the pruned model computes what the model with those scales at zero computes. False: fold the closest
        per-channel constant there instead (a slightly smaller, approximate model).

    Returns:
      PruneResult(model, variables, report).
    """
    _check_arguments(threshold, percent, min_channels)
    widths.model_widths(model)  # fail early on a model outside the width protocol
    if probe is None:
        probe = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    probe = jnp.asarray(probe)
    paths, values, treedef = _flatten(model, variables, probe)
    graph = ChannelGraph()
    leaves = [Leaf(p, v, [graph.alloc(d) for d in v.shape]) for p, v in zip(paths, values, strict=True)]
    closed = jax.make_jaxpr(lambda ls, x: model.apply(treedef.unflatten(ls), x, train=False))(values, probe)

    def zero_scales(vals, bns, classes=None):
        """`vals` with the BN scales of `classes` (all when None) at exactly zero."""
        vals = list(vals)
        for bn in bns:
            nodes, scale = leaves[bn.scale].axes[0], vals[bn.scale]
            zero = True if classes is None else np.isin(graph.roots(nodes), list(classes))
            vals[bn.scale] = np.where(zero, 0, scale).astype(scale.dtype)
        return vals

    def walk(bns, zeroed=None, uses=None, carriers=None):
        """A walk with the scales of the `zeroed` classes (of every BN when None) at exactly zero; all of them
        but the `carriers`' classes are removed."""
        graph.begin_walk()
        with_values = [Leaf(leaf.path, v, leaf.axes)
                       for leaf, v in zip(leaves, zero_scales(values, bns, zeroed), strict=True)]
        removed = None if zeroed is None else zeroed - carrier_classes(carriers)
        return Walker(graph, with_values, removed, uses, carriers).run(closed, len(leaves))

    candidates = slicing.find_batchnorms(leaves)
    first = walk(candidates)  # records the channel classes; exits read constants iff BN-gated
    bns = slicing.joined(candidates, leaves, graph)
    if len(bns) != len(candidates):
        first = walk(bns)
    layers = list(first.layers.values())
    shapes_of = functools.partial(widths.abstract_shapes, probe=probe, paths=paths)
    controls = widths.resolve(model, layers, leaves, graph, shapes_of)
    if percent is not None:
        threshold = slicing.percent_threshold(leaves, bns, percent)
    blocked, folded, requested, carriers = set(), None, {}, {}
    for _ in range(MAX_WALKS):
        removed, clamped, kept_meeting = slicing.decide(
            graph, leaves, bns, layers, controls, threshold, min_channels, blocked
        )
        if not fold:
            break
        carriers = {k: c for k, c in requested.items() if c[1] in removed} if exact else None
        folded = walk(bns, zeroed=removed, uses=first.uses, carriers=carriers)
        blocked |= folded.unfoldable  # (only with exotic gating) not constant after all: keep them
        requested.update(folded.requests)
        if not folded.unfoldable and not folded.requests:
            break
    kept_zero = carrier_classes(carriers)
    removed -= kept_zero  # kept, with their scales at zero: constant inputs for the carried kernels

    adjusted = zero_scales(values, bns, kept_zero)
    for i, delta in (folded.adjust if folded else {}).items():
        adjusted[i] = (adjusted[i] + delta).astype(values[i].dtype)
    gone = slicing.removed_mask(graph, removed)
    sliced = slicing.slice_leaves(leaves, adjusted, gone)
    by_kernel = widths.layers_by_kernel(layers)
    own = [by_kernel[kernels[0]] for kernels in controls]
    pruned = model.clone(widths=tuple(slicing.kept_width(leaves, layer, gone) for layer in own))
    widths.check_shapes(pruned, sliced, paths, shapes_of)
    new_variables = treedef.unflatten([jnp.asarray(v) for v in sliced])
    report = reporting.summary(
        (model, variables), (pruned, new_variables), probe,
        threshold=float(threshold), percent=percent, min_channels=int(min_channels),
        layers=[
            {"layer": layer.name, "before": int(before), "after": int(after), "clamped": i in clamped,
             "carriers": int(np.isin(graph.roots(leaves[layer.kernel].axes[layer.out_axis]),
                                     list(kept_zero)).sum())}
            for i, (layer, before, after) in enumerate(zip(own, model.widths, pruned.widths, strict=True))
        ],
        kept_meeting_criterion=sum(
            int(np.isin(graph.roots(leaves[layer.kernel].axes[layer.out_axis]), list(kept_meeting)).sum())
            for layer in own
        ),
        fold={
            "enabled": bool(fold),
            "absorbed": sorted(set(folded.absorbed)) if folded else [],
            "approximate": sorted(set(folded.approximate)) if folded else [],
            "carriers": sorted(set(folded.carried)) if folded else [],
            "carrier_channels": len(kept_zero),
            "unabsorbed": folded.unabsorbed if folded else [],
        },
    )
    return PruneResult(pruned, new_variables, report)
