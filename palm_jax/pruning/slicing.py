"""Which channel classes go, the sliced variables and the gather indices of the pruned model.

Channels tied by the trace form one class. A class is removed when
- every BN scale in it meets the criterion (|scale| <= threshold; 0 means exactly zero; vacuous when the
  class holds no BN scale),
- it is produced by a resizable conv (its output channels) or by a gather (the BN side of a gathering BN),
  no fixed-width conv produces it, it is not pinned, and every conv or Dense reading it reads a value that
  is constant once those scales are zero (it only reaches them through its BNs),
- every gather edge out of it leads to a removed class (a stream channel stays while any BN that gathers
  it keeps it),
- `min_channels` does not keep it: a conv output or a gathering BN left with fewer channels gets back its
  largest-|scale| ones (a stream channel ranks by the largest scale it feeds).
"""

import numpy as np

from palm_jax.pruning.graph import ChannelGraph, Leaf


def percent_threshold(leaves: list[Leaf], bns, percent: float) -> float:
    """Network Slimming's global rule: the sorted |scales| of all BNs together, at index floor(n p / 100)."""
    if not bns:
        raise ValueError("prune: percent needs BatchNorm scales, and the model has no nn.BatchNorm")
    scales = np.sort(np.concatenate([np.abs(leaves[bn.scale].value) for bn in bns]))
    return float(scales[int(len(scales) * percent / 100)])


def class_edges(graph: ChannelGraph) -> dict:
    """Gather edges between classes: source root -> set of target roots (ties within a class dropped)."""
    roots, out = graph.all_roots(), {}
    for stream, side in graph.edges:
        for s, t in zip(roots[stream].tolist(), roots[side].tolist(), strict=True):
            if s != t:
                out.setdefault(s, set()).add(t)
    return out


def _fixpoint(removed: set, edges: dict) -> set:
    """Drop from `removed` every class with a gather edge to a kept class, until none is left."""
    sources = {}
    for s, targets in edges.items():
        for t in targets:
            sources.setdefault(t, []).append(s)
    removed = set(removed)
    queue = [t for t in sources if t not in removed]
    while queue:
        for s in sources.get(queue.pop(), ()):
            if s in removed:
                removed.discard(s)
                queue.append(s)
    return removed


def decide(graph, leaves, bns, layers, resizable, edges, clamp_axes, threshold: float, min_channels: int,
           blocked=frozenset(), kept=frozenset()):
    """(removed class roots, indices of `clamp_axes` given back channels by `min_channels`, roots that meet
    the criterion but stay).

    `layers` are the traced conv/Dense layers (exits recorded with all BN scales zero), `resizable` the
    kernels whose output width may change, `edges` the class-level gather edges, `clamp_axes` node arrays
    that must keep min_channels (each resizable conv's output axis, each gathering BN), `blocked` roots a
    walk found unfoldable, `kept` roots that stay whatever their scales (carriers).
    """
    roots = graph.all_roots()
    score, meets = {}, {}
    for bn in bns:
        scale = np.abs(leaves[bn.scale].value)
        for root, s in zip(roots[leaves[bn.scale].axes[0]].tolist(), scale.tolist(), strict=True):
            score[root] = max(score.get(root, 0.0), s)
            meets[root] = meets.get(root, True) and s <= threshold
    produced, fixed = set(), set(blocked) | set(kept)
    for layer in layers:
        out = roots[leaves[layer.kernel].axes[layer.out_axis]].tolist()
        (produced if layer.kernel in resizable else fixed).update(out)
        for nodes, constant in layer.exits:
            fixed.update(roots[nodes[~constant]].tolist())
    produced.update(t for targets in edges.values() for t in targets)
    own = {r for r in produced - fixed if meets.get(r, True) and not graph.is_pinned(r)}
    removed = _fixpoint(own, edges)
    rank = {r: max([score.get(r, 0.0)] + [score.get(t, 0.0) for t in edges.get(r, ())]) for r in produced}
    axes = [roots[nodes] for nodes in clamp_axes]
    lacking = lambda axis: min(min_channels, len(axis)) - int(np.sum(~np.isin(axis, list(removed))))
    clamped = [i for i, axis in enumerate(axes) if lacking(axis) > 0]
    for i in clamped:
        axis, need = axes[i], lacking(axes[i])
        for root in sorted(set(axis.tolist()) & removed, key=lambda r: -rank.get(r, 0.0)):
            if need <= 0:
                break
            stack = [root]  # give back the class and what it feeds
            while stack:
                r = stack.pop()
                if r in removed:
                    removed.discard(r)
                    stack.extend(edges.get(r, ()))
            need -= int(np.sum(axis == root))
    removed = _fixpoint(removed, edges)
    meeting = {r for r, ok in meets.items() if ok} | {
        s for s, targets in edges.items() if meets.get(s, True) and all(meets.get(t, False) for t in targets)
    }
    return removed, clamped, meeting - removed - set(kept)


def zero_scales(values: list[np.ndarray], leaves: list[Leaf], bns, roots: np.ndarray, classes) -> list:
    """`values` with the BN scales of `classes` (class roots) at exactly zero."""
    values = list(values)
    chosen = np.asarray(sorted(classes), dtype=np.int64)
    for bn in bns:
        zero = np.isin(roots[leaves[bn.scale].axes[0]], chosen)
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
