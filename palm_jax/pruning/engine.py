"""The pruning engine, independent of how a model is rebuilt (Linen's width protocol, NNX's modules).

    structure = analyse(paths, values, closed, gathering=lambda bn_name: True, fixed={leaf indices})
    plan = structure.plan(values, resizable={kernel leaf indices}, threshold=0.0, min_channels=1)
    plan.values            # sliced (and folded) leaves, in the order of `paths`
    plan.keep[i][axis]     # per leaf, per axis: which positions stay (bool arrays)
    plan.selections[name]  # per gathering BN (module path): the stream positions it reads, None: all kept
    plan.widths[kernel]    # per resizable conv / Dense kernel leaf: kept output channels
    plan.reference         # unsliced values with the removed (and carrier) BN scales at zero: the sparse
                           # model the pruned one must equal

Inputs: the leaves (paths: the collection, "params" or "batch_stats", then the module path, then the leaf
name, e.g. ("params", "block", "conv", "kernel"), ("batch_stats", "block", "bn", "mean"); values: NumPy
arrays; any order), the closed jaxpr of an eval-mode forward pass taking those leaves then the input batch
(`jax.make_jaxpr(lambda leaves, x: forward(leaves, x))(values, probe)`), which BatchNorms may gather their
input (`gathering(bn module path) -> bool`, the others are tied to what they read), which leaves keep their
shapes whatever the scales (`fixed`: pinned, with every channel they touch) and, per plan, which
conv / Dense kernels may change their output width (`resizable`; the others keep theirs). A BN is a module
with params `scale` (and `bias`) and batch_stats `mean`, `var` of one size; a conv is a
`conv_general_dilated` whose kernel is a leaf (its `feature_group_count` is respected: a depthwise conv's
channels go with its input's, a grouped conv's per group). `structure.layers` are the traced conv / Dense
layers in forward order (name = module path, kernel leaf, in / out axis, groups, depthwise),
`structure.bn_order()` the BN module paths in forward order.

After the rebuild (the front end's job: `api.py` for Linen, `nnx.py` for NNX), trace the rebuilt module
the same way and finish with the shared pieces: `report.check(closed, values, plan, pruned_closed, probe)`
(float64 logits of both, no compilation), `flops.count(closed, len(values), paths)` (both FLOP conventions,
per example), `report.summary(plan, structure, reported_kernels, probe, check, ...)` and
`report.refusal(...)` when the relative deviation exceeds the tolerance.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from palm_jax.pruning import slicing
from palm_jax.pruning.graph import BatchNorm, ChannelGraph, Leaf, find_batchnorms
from palm_jax.pruning.trace import Walk, Walker

MAX_WALKS = 10


@dataclass
class Plan:
    """What `Structure.plan` decided: see the module docstring; `reference` are the unsliced values with the
    removed (and carrier) scales at zero, the sparse model the pruned one must equal."""

    values: list
    keep: list
    selections: dict
    widths: dict
    reference: list
    clamped: list
    carriers: dict  # kernel -> carrier channels among its outputs
    bn_channels: list  # per BN in forward order: (name, before, after, carriers, gathers)
    kept_meeting: int
    fold: dict
    threshold: float
    seconds: dict = field(default_factory=dict)


@dataclass
class Structure:
    """The channel graph of one traced forward pass (values aside): reusable across `plan` calls."""

    closed: object
    paths: list
    graph: ChannelGraph
    axes: list
    bns: list
    layers: list  # conv / Dense layers in forward order (first application)
    uses: dict
    gathering: dict  # BN index -> its single entry (stream nodes, indices, BN-side nodes)
    first: Walk | None = None  # a walk with every BN scale zero (its layers' exits)
    _owners: tuple | None = None
    _consts: dict = field(default_factory=dict)  # per leaf: (value, its constants), reused while unchanged

    def leaves(self, values) -> list[Leaf]:
        return [Leaf(p, np.asarray(v), a) for p, v, a in zip(self.paths, values, self.axes, strict=True)]

    def walk(self, leaves, bns_zero, **kwargs) -> Walk:
        """A walk with the scales of the classes `bns_zero` (of every BN when None) at exactly zero."""
        if self._owners is None or self._owners[0] != set(self.gathering):
            gather_leaves = {i: b for b in self.gathering for i in self.bns[b].leaves}
            owner = {int(n): b for i, b in gather_leaves.items() for n in self.axes[i][0]}
            self._owners = (set(self.gathering), gather_leaves, owner)
        _, gather_leaves, owner = self._owners
        self.graph.begin_walk()
        values = [leaf.value for leaf in leaves]
        values = slicing.zero_scales(values, leaves, self.bns, self.graph.all_roots(), bns_zero) \
            if bns_zero is not None else _all_scales_zero(values, self.bns)  # bns_zero: a mask over roots
        leaves = [Leaf(p, v, a) for p, v, a in zip(self.paths, values, self.axes, strict=True)]
        walker = Walker(self.graph, leaves, uses=self.uses, gather_leaves=gather_leaves, owner=owner,
                        consts=self._consts, **kwargs)
        return walker.run(self.closed, len(leaves))

    def plan(self, values, resizable, *, threshold=0.0, percent=None, min_channels=1, fold=True,
             exact=True) -> Plan:
        clock = time.perf_counter()
        leaves = self.leaves(values)
        # which reads are constant with every scale at zero: structural, so kept for later values (were a
        # removed channel read non-constantly after all, the folding walk blocks it)
        first = self.first = self.first if self.first is not None else self.walk(leaves, None)
        layers = [first.layers[k] for k in (layer.kernel for layer in self.layers)]
        if percent is not None:
            threshold = slicing.percent_threshold(leaves, self.bns, percent)
        edges = self.graph.class_edges()
        n = len(self.graph)
        clamp_axes = [leaves[k].axes[_layer(layers, k).out_axis] for k in _ordered(layers, resizable)] + [
            leaves[self.bns[b].scale].axes[0] for b in self.gathering
        ]
        decide = lambda blocked, kept: slicing.decide(self.graph, leaves, self.bns, layers, resizable, edges,
                                                      clamp_axes, threshold, min_channels, blocked, kept)
        seconds = {"decide": time.perf_counter() - clock, "fold": 0.0}
        blocked, requested, force, carriers, walk = np.zeros(n, dtype=bool), {}, set(), {}, None
        kept = np.zeros(n, dtype=bool)
        for _ in range(MAX_WALKS if fold else 0):
            clock = time.perf_counter()
            removed, _, _ = decide(blocked, None)
            carriers = {k: c for k, c in requested.items() if removed[c[1]]} if exact else {}
            kept = slicing.mask_of(n, (c[1] for c in carriers.values()))
            removed, clamped, meeting = decide(blocked, kept)
            seconds["decide"] += time.perf_counter() - clock
            clock = time.perf_counter()
            walk = self.walk(leaves, removed | kept, removed=removed, carriers=carriers if exact else None,
                             force=frozenset(force))
            seconds["fold"] += time.perf_counter() - clock
            unfoldable = np.fromiter(walk.unfoldable, dtype=np.int64)
            news = (not blocked[unfoldable].all(), set(walk.requests) - set(requested), walk.force - force)
            blocked[unfoldable] = True
            requested.update({k: c for k, c in walk.requests.items() if k not in requested})
            force |= walk.force
            if not any(news):
                break
        if walk is None:
            removed, clamped, meeting = decide(blocked, None)
        clock = time.perf_counter()
        plan = self._slice(leaves, values, resizable, layers, removed, kept, clamped, meeting, walk)
        plan.threshold = float(threshold)
        plan.fold.update(enabled=bool(fold), blocked=int(blocked.sum()))
        seconds["slice"] = time.perf_counter() - clock
        plan.seconds = seconds
        return plan

    def _slice(self, leaves, values, resizable, layers, removed, kept_zero, clamped, meeting, walk) -> Plan:
        roots = self.graph.all_roots()
        reference = slicing.zero_scales(values, leaves, self.bns, roots, removed | kept_zero)
        adjusted = list(reference)
        for i, delta in (walk.adjust if walk else {}).items():
            adjusted[i] = (adjusted[i] + delta).astype(np.asarray(values[i]).dtype)
        gone, is_zero = removed[roots], kept_zero[roots]
        sliced, keep = slicing.slice_leaves(leaves, adjusted, gone)
        out_nodes = {layer.kernel: leaves[layer.kernel].axes[layer.out_axis] for layer in layers}
        order = _ordered(layers, resizable)
        bn_channels = []
        for b in self._bn_order():
            nodes = leaves[self.bns[b].scale].axes[0]
            bn_channels.append((self.bns[b].name, len(nodes), int(np.sum(~gone[nodes])),
                                int(np.sum(is_zero[nodes])), b in self.gathering))
        names = lambda kernels: sorted({leaves[k].module for k in kernels})
        return Plan(
            values=sliced, keep=keep, reference=reference,
            selections={self.bns[b].name: slicing.selection(e, gone) for b, e in self.gathering.items()},
            widths={k: int(np.sum(~gone[out_nodes[k]])) for k in order},
            clamped=[order[i] for i in clamped if i < len(order)],
            carriers={k: int(np.sum(is_zero[out_nodes[k]])) for k in order},
            bn_channels=bn_channels,
            kept_meeting=sum(int(meeting[roots[out_nodes[k]]].sum()) for k in order),
            fold={
                "absorbed": sorted(set(walk.absorbed)) if walk else [],
                "approximate": sorted(set(walk.approximate)) if walk else [],
                "carriers": names(walk.carried) if walk else [],
                "carrier_channels": int(kept_zero.sum()),
                "unabsorbed": walk.unabsorbed if walk else [],
            },
            threshold=0.0,
        )

    def _bn_order(self) -> list[int]:
        """BN indices in forward order (first use of their mean)."""
        first = {leaf: i for i, leaf in enumerate(self.uses)}
        return sorted(range(len(self.bns)), key=lambda b: first.get(self.bns[b].mean, len(first)))

    def bn_order(self) -> list[str]:
        return [self.bns[b].name for b in self._bn_order()]


def _all_scales_zero(values, bns: list[BatchNorm]) -> list:
    values = list(values)
    for bn in bns:
        values[bn.scale] = np.zeros_like(values[bn.scale])
    return values


def _layer(layers, kernel):
    return next(layer for layer in layers if layer.kernel == kernel)


def _ordered(layers, resizable) -> list[int]:
    return [layer.kernel for layer in layers if layer.kernel in resizable]


def analyse(paths, values, closed, gathering=lambda name: False, fixed=frozenset()) -> Structure:
    """Walk the traced forward pass once: channel classes, gather edges, layers and BatchNorms.

    A BN applied more than once, or whose vectors the walk does not join, is tied to what it reads instead
    of gathering. `fixed` are leaf indices whose every axis keeps all its positions (pinned): the leaves of
    layers the front end cannot resize, and so the channels they touch."""
    values = [np.asarray(v) for v in values]
    allowed = None
    while True:
        graph = ChannelGraph()
        axes = [[graph.alloc(d, pinned=i in fixed) for d in v.shape] for i, v in enumerate(values)]
        leaves = [Leaf(p, v, a) for p, v, a in zip(paths, values, axes, strict=True)]
        bns = find_batchnorms(leaves)
        chosen = {b for b, bn in enumerate(bns) if gathering(bn.name)} if allowed is None else allowed
        structure = Structure(closed, list(paths), graph, axes, bns, [], {}, dict.fromkeys(chosen))
        first = structure.walk(leaves, None)
        roots = np.fromiter((graph.find(i) for i in range(len(graph))), dtype=np.int64, count=len(graph))
        joined = [b for b, bn in enumerate(bns) if all(
            np.array_equal(roots[axes[i][0]], roots[axes[bn.scale][0]]) for i in bn.leaves)]
        good = {b for b in chosen if len(first.entries.get(b, [])) == 1 and b in joined}
        if good == chosen:
            break
        allowed = good
    structure.uses = first.uses
    sizes = np.bincount(roots, minlength=len(graph))
    for nodes, stream in first.gathers:  # a gathered value read other than by gathering BNs pins its stream
        if np.any(sizes[roots[nodes]] > 1) or any(graph.is_pinned(int(r)) for r in roots[nodes]):
            graph.pin(stream)
    structure.bns = [bns[b] for b in joined]
    renumber = {b: j for j, b in enumerate(joined)}
    structure.gathering = {renumber[b]: first.entries[b][0] for b in sorted(chosen)}
    structure.layers = list(first.layers.values())
    graph.freeze()
    structure.first = first if len(joined) == len(bns) else None
    return structure
