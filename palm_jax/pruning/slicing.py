"""Which channel classes go, the sliced variables and the gather indices of the pruned model.

Channels tied by the trace form one class. A class is removed when
- every BN scale in it meets the criterion (|scale| <= threshold; 0 means exactly zero; vacuous when the
  class holds no BN scale),
- it is produced by a resizable conv (its output channels) or by a gather (the BN side of a gathering BN),
  no fixed-width conv produces it, it is not pinned, and every conv or Dense reading it reads a value that
  is constant once those scales are zero (it only reaches them through its BNs),
- every gather edge out of it leads to a removed class (a stream channel stays while any BN that gathers
  it keeps it),
- `min_channels` does not keep it: a conv output or a gathering BN left with fewer channels (carriers not
  counted) gets back its largest-|scale| ones (a stream channel ranks by the largest scale it feeds).
"""

import numpy as np

from palm_jax.pruning.graph import Leaf


def percent_threshold(leaves: list[Leaf], bns, percent: float) -> float:
    """Network Slimming's global rule: the sorted |scales| of all BNs together, at index floor(n p / 100)."""
    if not bns:
        raise ValueError("prune: percent needs BatchNorm scales, and the model has no nn.BatchNorm")
    scales = np.sort(np.concatenate([np.abs(leaves[bn.scale].value) for bn in bns]))
    return float(scales[int(len(scales) * percent / 100)])


def _fixpoint(removed: np.ndarray, edges) -> np.ndarray:
    """Keep every class with a gather edge to a kept class, until none is left (`removed`: per root)."""
    sources, targets = edges
    removed = removed.copy()
    while True:
        keep = removed[sources] & ~removed[targets]
        if not keep.any():
            return removed
        removed[sources[keep]] = False


def decide(graph, leaves, bns, layers, resizable, edges, clamp_axes, threshold: float, min_channels: int,
           blocked=None, kept=None):
    """(removed, indices of `clamp_axes` given back channels by `min_channels`, meeting the criterion but
    kept): masks over class roots (node ids).

    `layers` are the traced conv/Dense layers (exits recorded with all BN scales zero), `resizable` the
    kernels whose output width may change, `edges` the class-level gather edges (sources, targets),
    `clamp_axes` node arrays that must keep min_channels (each resizable conv's output axis, each gathering
    BN), `blocked` roots a walk found unfoldable, `kept` roots that stay whatever their scales (carriers:
    they do not count towards min_channels).
    """
    roots = graph.all_roots()
    n = len(roots)
    score, meets, has_bn = np.zeros(n), np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    for bn in bns:
        at = roots[leaves[bn.scale].axes[0]]
        scale = np.abs(np.asarray(leaves[bn.scale].value, dtype=np.float64))
        np.maximum.at(score, at, scale)
        np.logical_and.at(meets, at, scale <= threshold)
        has_bn[at] = True
    produced, fixed = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for mask in (blocked, kept):
        if mask is not None:
            fixed |= mask
    for layer in layers:
        out = roots[leaves[layer.kernel].axes[layer.out_axis]]
        (produced if layer.kernel in resizable else fixed)[out] = True
        for nodes, constant in layer.exits:
            fixed[roots[nodes[~constant]]] = True
    sources, targets = edges
    produced[targets] = True
    removed = _fixpoint(produced & ~fixed & meets & ~graph.pinned_mask(), edges)
    rank = score.copy()
    np.maximum.at(rank, sources, score[targets])  # a stream channel ranks by the largest scale it feeds
    axes = [roots[nodes] for nodes in clamp_axes]
    carrier = kept if kept is not None else np.zeros(n, dtype=bool)  # a carrier is no channel of its own
    lacking = lambda axis: min(min_channels, len(axis)) - int(np.sum(~removed[axis] & ~carrier[axis]))
    clamped = [i for i, axis in enumerate(axes) if lacking(axis) > 0]
    feeds = {}
    for s, t in zip(sources.tolist(), targets.tolist(), strict=True) if clamped else ():
        feeds.setdefault(s, []).append(t)
    for i in clamped:
        axis, need = axes[i], lacking(axes[i])
        for root in sorted(set(axis[removed[axis] & ~carrier[axis]].tolist()), key=lambda r: -rank[r]):
            if need <= 0:
                break
            stack = [root]  # give back the class and what it feeds
            while stack:
                r = stack.pop()
                if removed[r]:
                    removed[r] = False
                    stack.extend(feeds.get(r, ()))
            need -= int(np.sum(axis == root))
    removed = _fixpoint(removed, edges)
    feeding_ok = np.ones(n, dtype=bool)
    np.logical_and.at(feeding_ok, sources, meets[targets] & has_bn[targets])
    touched = has_bn.copy()
    touched[sources] = True
    meeting = touched & meets & feeding_ok & ~removed
    if kept is not None:
        meeting &= ~kept
    return removed, clamped, meeting


def mask_of(n: int, roots) -> np.ndarray:
    """A mask over class roots from an iterable of roots."""
    mask = np.zeros(n, dtype=bool)
    mask[np.fromiter(roots, dtype=np.int64)] = True
    return mask


def zero_scales(values: list[np.ndarray], leaves: list[Leaf], bns, roots: np.ndarray, classes) -> list:
    """`values` with the BN scales of `classes` (a mask over class roots) at exactly zero."""
    values = list(values)
    for bn in bns:
        zero = classes[roots[leaves[bn.scale].axes[0]]]
        if zero.any():
            values[bn.scale] = np.where(zero, 0, values[bn.scale]).astype(values[bn.scale].dtype)
    return values


def slice_leaves(leaves: list[Leaf], values: list[np.ndarray], gone: np.ndarray) -> tuple[list, list]:
    """Drop the removed positions along every axis of every leaf: (sliced values, keep masks per axis)."""
    out, masks = [], []
    for leaf, value in zip(leaves, values, strict=True):
        keep = [~gone[nodes] for nodes in leaf.axes]
        for axis, k in enumerate(keep):
            if not k.all():
                value = np.compress(k, value, axis=axis)
        out.append(value)
        masks.append(keep)
    return out, masks


def selection(entry, gone: np.ndarray) -> tuple[int, ...] | None:
    """The positions in the pruned stream that a gathering BN reads (None: all kept stream channels in
    order). `entry` is (stream nodes, stream position per BN position, BN-side nodes) as traced."""
    stream, index, side = entry
    kept = ~gone[side]
    position = np.cumsum(~gone[stream]) - 1
    chosen = position[index[kept]]
    if len(chosen) == int(np.sum(~gone[stream])) and np.array_equal(chosen, np.arange(len(chosen))):
        return None
    return tuple(int(i) for i in chosen)
