"""Which channel classes go, and the sliced variables.

A class (channels tied by the trace) is removed when
- every BN scale attached to it satisfies the criterion (|scale| <= threshold; 0 means exactly zero),
- it is prunable: not pinned, it holds the output channels of at least one conv whose width is a
  `widths` entry (and of no conv with a fixed width), and every conv or Dense reading it reads a value that
  is constant once those scales are zero (it only reaches them through its BNs),
- `min_channels` does not keep it: a layer left with fewer channels gets back its largest-|scale| ones.
"""

from dataclasses import dataclass

import numpy as np

from palm_jax.pruning.graph import ChannelGraph, Leaf


@dataclass
class BatchNorm:
    """Leaf indices of one BN's scale and running statistics."""

    scale: int
    mean: int
    var: int


def find_batchnorms(leaves: list[Leaf]) -> list[BatchNorm]:
    """Modules with a 1-D params `scale` and batch_stats `mean` and `var` of the same size."""
    index = {leaf.path: i for i, leaf in enumerate(leaves)}
    found = []
    for i, leaf in enumerate(leaves):
        if leaf.path[0] != "params" or leaf.path[-1] != "scale" or leaf.value.ndim != 1:
            continue
        module = leaf.path[1:-1]
        mean, var = index.get(("batch_stats", *module, "mean")), index.get(("batch_stats", *module, "var"))
        vectors = [leaves[j].value.shape for j in (mean, var) if j is not None]
        if vectors == [leaf.value.shape] * 2:
            found.append(BatchNorm(i, mean, var))
    return found


def joined(bns: list[BatchNorm], leaves: list[Leaf], graph: ChannelGraph) -> list[BatchNorm]:
    """The BNs whose scale, mean and var the trace joined to one channel space (a BN recognised)."""
    def same(bn):
        roots = graph.roots(leaves[bn.scale].axes[0])
        return all(np.array_equal(graph.roots(leaves[j].axes[0]), roots) for j in (bn.mean, bn.var))

    return [bn for bn in bns if same(bn)]


def percent_threshold(leaves: list[Leaf], bns: list[BatchNorm], percent: float) -> float:
    """Network Slimming's global rule: the sorted |scales| of all BNs together, at index floor(n p / 100)."""
    if not bns:
        raise ValueError("prune: percent needs BatchNorm scales, and the model has no nn.BatchNorm")
    scales = np.sort(np.concatenate([np.abs(leaves[bn.scale].value) for bn in bns]))
    return float(scales[int(len(scales) * percent / 100)])


def decide(graph, leaves, bns, layers, controls, threshold: float, min_channels: int, blocked=frozenset()):
    """The removed class roots, the widths entries clamped by `min_channels`, and the roots that meet the
    criterion but stay (not prunable, or given back by `min_channels`).

    `layers` are the traced conv/Dense layers (exits recorded with all BN scales zero), `controls[i]` the
    kernels whose output width is widths entry i, `blocked` roots found unfoldable by a later walk.
    """
    score, meets = {}, {}
    for bn in bns:
        scale = np.abs(leaves[bn.scale].value)
        for root, s in zip(graph.roots(leaves[bn.scale].axes[0]).tolist(), scale.tolist(), strict=True):
            score[root] = max(score.get(root, 0.0), s)
            meets[root] = meets.get(root, True) and s <= threshold
    controlled = {k for kernels in controls for k in kernels}
    prunable, fixed = set(), set(blocked)
    for layer in layers:
        roots = set(graph.roots(leaves[layer.kernel].axes[layer.out_axis]).tolist())
        (prunable if layer.kernel in controlled else fixed).update(roots)
        for nodes, constant in layer.exits:
            fixed.update(graph.roots(nodes[~constant]).tolist())
    prunable = {r for r in prunable - fixed if meets.get(r, False) and not graph.is_pinned(r)}
    axes = [graph.roots(leaves[kernels[0]].axes[_out_axis(layers, kernels[0])]) for kernels in controls]
    short = [i for i, roots in enumerate(axes) if np.sum(~np.isin(roots, list(prunable))) < min(min_channels,
                                                                                                 len(roots))]
    removed = set(prunable)
    for i in short:  # give back the largest-|scale| channels (of every layer they are tied to)
        roots = axes[i]
        need = min(min_channels, len(roots)) - int(np.sum(~np.isin(roots, list(removed))))
        for root in sorted(set(roots.tolist()) & removed, key=lambda r: -score.get(r, 0.0)):
            if need <= 0:
                break
            removed.discard(root)
            need -= int(np.sum(roots == root))
    candidates = {r for r, ok in meets.items() if ok}
    return removed, short, candidates - removed


def _out_axis(layers, kernel: int) -> int:
    return next(layer.out_axis for layer in layers if layer.kernel == kernel)


def removed_mask(graph: ChannelGraph, removed: set) -> np.ndarray:
    """Per node, whether its class is removed."""
    roots = graph.roots(np.arange(len(graph)))
    return np.isin(roots, list(removed))


def slice_leaves(leaves: list[Leaf], values: list[np.ndarray], gone: np.ndarray) -> list[np.ndarray]:
    """Drop the removed positions along every axis of every leaf."""
    out = []
    for leaf, value in zip(leaves, values, strict=True):
        for axis, nodes in enumerate(leaf.axes):
            keep = ~gone[nodes]
            if not keep.all():
                value = np.compress(keep, value, axis=axis)
        out.append(value)
    return out


def kept_width(leaves: list[Leaf], layer, gone: np.ndarray) -> int:
    return int(np.sum(~gone[leaves[layer.kernel].axes[layer.out_axis]]))
