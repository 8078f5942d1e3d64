"""Channel nodes, their ties and gather edges: a union-find over every channel position the pruner tracks.

Each axis of each variable leaf, and the last axis of each value the trace cannot attribute to a leaf,
gets one node per position. The trace unites the nodes that must be kept or removed together (a conv's
input axis with the channels it reads, both operands of an add, a BN's vectors with the channels they
normalise) and pins the nodes it cannot slice (the network input, anything an unknown op touches, the
outputs). A BatchNorm that may gather its input (`selections` in the width protocol) is not united with
the stream it reads: a gather edge goes from each stream node to the BN-side node at the same position, so
that the BN side can drop a channel the stream keeps. The first walk records all this; later walks over
the same jaxpr replay the allocations (their values get the same node ids) with everything frozen.
"""

from dataclasses import dataclass, field

import numpy as np


class ChannelGraph:
    """Union-find with a `pinned` flag per class, gather edges and replayable allocation."""

    def __init__(self):
        self._parent: list[int] = []
        self._pinned: list[bool] = []
        self._log: list[tuple[int, int]] = []
        self._replay: int | None = None
        self._walked = False
        self._root: np.ndarray | None = None  # node -> class root, once frozen
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []  # (stream nodes, BN-side nodes), recorded

    def alloc(self, n: int, *, pinned: bool = False) -> np.ndarray:
        """`n` new nodes (for leaf axes, allocated once before any walk)."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._pinned.extend([pinned] * n)
        return np.arange(start, start + n)

    def fresh(self, n: int, *, pinned: bool = False) -> np.ndarray:
        """Nodes for a value of a walk; while replaying, the nodes the same call got in the recorded walk."""
        if self._replay is None:
            nodes = self.alloc(n, pinned=pinned)
            self._log.append((len(self._parent) - n, n))
            return nodes
        start, size = self._log[self._replay]
        if size != n:
            raise RuntimeError("prune: the replayed trace diverged from the recorded one")
        self._replay += 1
        return np.arange(start, start + n)

    def __len__(self) -> int:
        return len(self._parent)

    def begin_walk(self) -> None:
        """The first walk records; every later one replays it with the classes frozen (`fresh` hands back
        the recorded nodes in the recorded order, `union`, `pin` and `gather` do nothing)."""
        if self._walked:
            self.freeze()
            self._replay = 0
        self._walked = True

    def freeze(self) -> None:
        if self._root is None:
            self._root = np.fromiter((self.find(i) for i in range(len(self))), dtype=np.int64,
                                     count=len(self))

    @property
    def frozen(self) -> bool:
        return self._replay is not None

    def find(self, i: int) -> int:
        if self._root is not None:
            return int(self._root[i])
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def roots(self, nodes: np.ndarray) -> np.ndarray:
        if self._root is not None:
            return self._root[nodes]
        return np.fromiter((self.find(int(i)) for i in nodes), dtype=np.int64, count=len(nodes))

    def all_roots(self) -> np.ndarray:
        self.freeze()
        return self._root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie `a[k]` to `b[k]` for every k (no-op once frozen: the recorded walk already did it)."""
        if self.frozen or a is b:
            return
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self._parent[rj] = ri
                self._pinned[ri] = self._pinned[ri] or self._pinned[rj]

    def gather(self, stream: np.ndarray, side: np.ndarray) -> None:
        """A gather edge from `stream[k]` to `side[k]` for every k (recorded walk only)."""
        if not self.frozen:
            self.edges.append((np.asarray(stream), np.asarray(side)))

    def pin(self, nodes: np.ndarray | None) -> None:
        if self.frozen or nodes is None:
            return
        for i in np.asarray(nodes).tolist():
            self._pinned[self.find(i)] = True

    def is_pinned(self, root: int) -> bool:
        return self._pinned[self.find(root)]

    def pinned_mask(self) -> np.ndarray:
        """Per class root (node id), whether the class is pinned (frozen graphs)."""
        roots = self.all_roots()
        return np.asarray(self._pinned, dtype=bool)[roots]

    def class_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """The gather edges between classes as (source roots, target roots), ties within a class dropped."""
        if not self.edges:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        roots = self.all_roots()
        pairs = np.unique(np.stack([np.concatenate([roots[s] for s, _ in self.edges]),
                                    np.concatenate([roots[t] for _, t in self.edges])], axis=1), axis=0)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        return pairs[:, 0], pairs[:, 1]


@dataclass
class Leaf:
    """One variable leaf: its path, value and a node array per axis."""

    path: tuple[str, ...]
    value: np.ndarray
    axes: list[np.ndarray]

    @property
    def module(self) -> str:
        return "/".join(self.path[1:-1])


@dataclass
class Layer:
    """A conv or Dense kernel, with what each application read. `groups` is the conv's feature group count;
    a depthwise conv (one input channel per group) ties each output channel to the input channel it reads."""

    name: str
    kernel: int
    kind: str
    in_axis: int
    out_axis: int
    groups: int = 1
    depthwise: bool = False
    exits: list = field(default_factory=list)  # (input nodes, value constant per position) per application


@dataclass
class BatchNorm:
    """Leaf indices of one BN's scale, bias (or None) and running statistics."""

    name: str
    scale: int
    bias: int | None
    mean: int
    var: int

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i in (self.scale, self.bias, self.mean, self.var) if i is not None)


def find_batchnorms(leaves: list[Leaf]) -> list[BatchNorm]:
    """Modules with a 1-D params `scale` and batch_stats `mean` and `var` of the same size."""
    index = {leaf.path: i for i, leaf in enumerate(leaves)}
    found = []
    for i, leaf in enumerate(leaves):
        if leaf.path[0] != "params" or leaf.path[-1] != "scale" or leaf.value.ndim != 1:
            continue
        module = leaf.path[1:-1]
        mean, var = index.get(("batch_stats", *module, "mean")), index.get(("batch_stats", *module, "var"))
        bias = index.get(("params", *module, "bias"))
        vectors = [leaves[j].value.shape for j in (mean, var) if j is not None]
        if vectors == [leaf.value.shape] * 2:
            if bias is not None and leaves[bias].value.shape != leaf.value.shape:
                bias = None
            found.append(BatchNorm(leaf.module, i, bias, mean, var))
    return found
