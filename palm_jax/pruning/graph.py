"""Channel nodes and their ties: a union-find over every channel position the pruner tracks.

Each axis of each variable leaf, and the last axis of each value the trace cannot attribute to a leaf,
gets one node per position. The trace unites the nodes that must be kept or removed together (a conv's
input axis with the channels it reads, both operands of an add, a BN's vectors with the channels they
normalise) and pins the nodes it cannot slice (the network input, anything an unknown op touches, the
outputs). A second walk over the same jaxpr replays the allocations, so its values get the same node ids.
"""

from dataclasses import dataclass, field

import numpy as np


class ChannelGraph:
    """Union-find with a `pinned` flag per class and replayable allocation."""

    def __init__(self):
        self._parent: list[int] = []
        self._pinned: list[bool] = []
        self._log: list[tuple[int, int]] = []
        self._replay: int | None = None
        self._walked = False

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
        the recorded nodes in the recorded order, `union` and `pin` do nothing)."""
        if self._walked:
            self._replay = 0
        self._walked = True

    @property
    def frozen(self) -> bool:
        return self._replay is not None

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def roots(self, nodes: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in nodes), dtype=np.int64, count=len(nodes))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie `a[k]` to `b[k]` for every k (no-op once frozen: the recorded walk already did it)."""
        if self.frozen or a is b:
            return
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self._parent[rj] = ri
                self._pinned[ri] = self._pinned[ri] or self._pinned[rj]

    def pin(self, nodes: np.ndarray | None) -> None:
        if self.frozen or nodes is None:
            return
        for i in nodes.tolist():
            self._pinned[self.find(i)] = True

    def is_pinned(self, root: int) -> bool:
        return self._pinned[self.find(root)]


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
    """A conv or Dense kernel, with what each application read."""

    name: str
    kernel: int
    kind: str
    in_axis: int
    out_axis: int
    exits: list = field(default_factory=list)  # (input nodes, value constant per position) per application
