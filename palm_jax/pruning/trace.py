"""Walk the jaxpr of an eval-mode forward pass and follow every channel axis.

Every value with rank >= 1 carries, for each position of its last axis,
- a channel node (`ChannelGraph`): elementwise ops unite their operands' nodes, a conv or Dense ties its
  kernel's input axis to the nodes it reads (a depthwise conv ties each output channel to the input channel
  it reads instead; a grouped conv ties the channels that share a kernel position across groups) and
  outputs its kernel's output-axis nodes, a concatenation on the last axis concatenates node lists, pools /
  spatial reductions / flattens keep or tile them, a BatchNorm that gathers gets a gather edge from the
  stream it reads. Any op that mixes or moves the channel axis in another way pins what it touches;
- the value, where it does not depend on the input (`values.Val`: a constant times a spatial pattern),
  computed from the variables: a BN with scale 0 makes `(x - mean) * 0 + bias` constant, and ReLU / pools
  keep it so;
- the offset the pruned network lacks there (folding walks only): removing channel p from a conv or Dense
  input removes `value[p] * sum(kernel taps)` from its output. Offsets pass through linear ops and are
  absorbed by the first bias or BN running mean they are added to or subtracted from.
A per-channel offset is exact only where it stays uniform over the image. Where it would not (zero padding
next to the conv, a patterned constant, a padded pool, a nonlinearity, an output), exact mode
(`carriers` given) uses a carrier instead: the conv keeps one input channel that is constant, whose kernel
slice takes over what the removed constants brought (`values.carrier_delta`), so that no offset leaves the
conv. The walk asks for carriers in `Walk.requests` (kernel leaf -> (input position, class root)) and
`Walk.force` (kernels whose offsets could not be folded exactly downstream); the next walk uses them.
Without `carriers` the closest per-channel constant is folded instead (`Walk.approximate`).
"""

from dataclasses import dataclass, field

import jax.extend.core as jcore
import numpy as np

from palm_jax.pruning import evaluate
from palm_jax.pruning.graph import ChannelGraph, Layer, Leaf
from palm_jax.pruning.shapes import CASTS, SHAPE_RULES, ShapeRules, last
from palm_jax.pruning.values import Val, carrier_delta, const_of, elementwise_const, nonzero, window_coverage

ELEMENTWISE = frozenset([
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1", "rsqrt",
    "sqrt", "cbrt", "tanh", "logistic", "abs", "sign", "integer_pow", "pow", "square", "erf", "erfc",
    "erf_inv", "convert_element_type", "copy", "copy_p", "select_n", "clamp", "eq", "ne", "gt", "ge",
    "lt", "le", "and", "or", "not", "xor", "floor", "ceil", "round", "is_finite", "nextafter", "rem",
    "sin", "cos", "tan", "atan2", "reduce_precision", "add_any",
])
ARRAY_LIMIT = 4096  # compile-time constants up to this size are evaluated (e.g. gather indices)


@dataclass
class Walk:
    """What one walk found; `adjust` maps a leaf index to the amount added to it by folding."""

    layers: dict = field(default_factory=dict)
    uses: dict = field(default_factory=dict)
    adjust: dict = field(default_factory=dict)
    absorbed: list = field(default_factory=list)
    unabsorbed: list = field(default_factory=list)
    approximate: list = field(default_factory=list)
    carried: dict = field(default_factory=dict)  # kernel -> carrier input position (kernel changed)
    requests: dict = field(default_factory=dict)
    force: set = field(default_factory=set)
    unfoldable: set = field(default_factory=set)
    entries: dict = field(default_factory=dict)  # BN id -> [(stream nodes, indices, BN-side nodes)]
    gathers: list = field(default_factory=list)  # (gathered value's nodes, stream nodes) per gather op


class Walker(ShapeRules):
    """One walk over the traced forward pass. `removed` (a mask over class roots) turns on folding.

    `gather_leaves` maps the leaves of every BatchNorm that gathers to its BN id; `owner` maps the nodes
    of those leaves to the same id; `force` are kernels that must carry (exact mode)."""

    def __init__(self, graph: ChannelGraph, leaves: list[Leaf], removed: np.ndarray | None = None,
                 uses=None, carriers: dict | None = None, gather_leaves=None, owner=None, force=frozenset(),
                 consts=None):
        self.graph, self.leaves, self.removed = graph, leaves, removed
        self.consts = {} if consts is None else consts  # leaf index -> (value, const_of(value)), reused
        self.uses = uses or {}  # consumers per leaf, counted by the first walk (a bias must have one)
        self.carriers = carriers  # None: approximate folding next to padding
        self.gather_leaves, self.owner = gather_leaves or {}, owner or {}
        self.force = force
        self.out = Walk()
        if removed is not None:
            self.gone = removed[graph.all_roots()]

    # -- driving -------------------------------------------------------------------------------------------
    def run(self, closed, n_leaves: int) -> Walk:
        jaxpr = closed.jaxpr
        ins = [self._leaf_val(i) for i in range(n_leaves)]
        for var in jaxpr.invars[n_leaves:]:
            ins.append(Val(self._fresh(var.aval, pinned=True), self._nan(var.aval)))
        outs = self._jaxpr(jaxpr, closed.consts, ins)
        for val in outs:
            self.graph.pin(val.nodes)
            self._lose(val, "model output")
        return self.out

    def _jaxpr(self, jaxpr, consts, ins: list[Val]) -> list[Val]:
        env = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = self._literal(var.aval, value)
        for var, val in zip(jaxpr.invars, ins, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            args = [self._read(env, v) for v in eqn.invars]
            outs = self._eqn(eqn, args)
            for var, val in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = val
        return [self._read(env, v) for v in jaxpr.outvars]

    def _read(self, env, var) -> Val:
        if isinstance(var, jcore.Literal):
            return self._literal(var.aval, var.val)
        return env[var]

    def _literal(self, aval, value) -> Val:
        nodes = self.graph.fresh(aval.shape[-1], pinned=True) if aval.shape else None
        value = np.asarray(value)
        return Val(nodes, const_of(value), array=value if value.size <= ARRAY_LIMIT else None)

    def _leaf_val(self, i: int) -> Val:
        leaf = self.leaves[i]
        nodes = leaf.axes[-1] if leaf.value.ndim else None
        cached = self.consts.get(i)
        if cached is None or cached[0] is not leaf.value:
            cached = self.consts[i] = (leaf.value, const_of(leaf.value))
        return Val(nodes, cached[1], leaf=i)

    def _fresh(self, aval, *, pinned=False):
        return self.graph.fresh(aval.shape[-1], pinned=pinned) if aval.shape else None

    @staticmethod
    def _nan(aval) -> np.ndarray:
        return np.full(aval.shape[-1:], np.nan)

    def _lose(self, val: Val, where: str) -> None:
        """An offset that reaches something it cannot pass exactly: carriers at its kernels (exact mode)."""
        if self.removed is not None and nonzero(val.off):
            self.out.unabsorbed.append(
                {"at": where, "from": sorted(self.leaves[k].module for k in val.src),
                 "max_abs": float(np.max(np.abs(val.off)))}
            )
            if self.carriers is not None:
                self.out.force.update(val.src)

    def _use(self, args, outs) -> None:
        kept = {o.leaf for o in outs}
        for a in args:
            if a.leaf is not None and a.leaf not in kept:
                self.out.uses[a.leaf] = self.out.uses.get(a.leaf, 0) + 1

    # -- rules ---------------------------------------------------------------------------------------------
    def _eqn(self, eqn, args: list[Val]) -> list[Val]:
        name = eqn.primitive.name
        sub = evaluate.inner(eqn)
        if sub is not None:
            return self._jaxpr(sub[0], sub[1], args)
        if name == "optimization_barrier":
            return list(args)
        method = {"conv_general_dilated": "_conv", "dot_general": "_dot", **SHAPE_RULES}.get(name)
        if method is None and name in ELEMENTWISE:
            method = "_elementwise"
        out = getattr(self, method)(eqn, args) if method is not None else None
        out = out if out is not None else self._pin(eqn, args)
        self._use(args, out)
        if all(a.array is not None for a in args) and all(
            np.prod(v.aval.shape, dtype=int) <= ARRAY_LIMIT for v in eqn.outvars
        ):
            for val, array in zip(out, evaluate.apply(eqn, [a.array for a in args]), strict=True):
                val.array = array
        return out

    def _pin(self, eqn, args) -> list[Val]:
        """Unknown op: nothing it touches can be sliced, nothing it outputs is constant."""
        for a in args:
            self.graph.pin(a.nodes)
            self._lose(a, eqn.primitive.name)
        return [Val(self._fresh(v.aval, pinned=True), self._nan(v.aval)) for v in eqn.outvars]

    def _elementwise(self, eqn, args):
        name, aval = eqn.primitive.name, eqn.outvars[0].aval
        width = last(aval)
        nodes = None
        if width is not None:
            full = [a for a, v in zip(args, eqn.invars, strict=True) if last(v.aval) == width and
                    a.nodes is not None]
            nodes = self._tie(full) if full else self.graph.fresh(width)
        const, pattern = elementwise_const(eqn, args, aval)
        cast = name in CASTS
        off, src = self._elementwise_off(eqn, args, aval)
        return [Val(nodes, const, args[0].leaf if cast else None, off, src, pattern,
                    args[0].view if cast else None)]

    def _tie(self, full: list[Val]) -> np.ndarray:
        """Unite the operands' nodes; where a gathering BN's leaf meets a stream, a gather edge instead."""
        bns = {self.gather_leaves[a.leaf] for a in full if a.leaf in self.gather_leaves}
        if len(bns) == 1:
            (bn,) = bns
            own = [a for a in full if self.owner.get(int(a.nodes[0])) == bn]
            stream = [a for a in full if self.owner.get(int(a.nodes[0])) != bn]
            for a in stream:
                base, index = a.view if a.view is not None else (a.nodes, np.arange(len(a.nodes)))
                self.graph.gather(base[index], own[0].nodes)
                self.out.entries.setdefault(bn, []).append((base, index, own[0].nodes))
            for a in own[1:]:
                self.graph.union(own[0].nodes, a.nodes)
            return own[0].nodes
        for a in full[1:]:
            self.graph.union(full[0].nodes, a.nodes)
        return full[0].nodes

    def _elementwise_off(self, eqn, args, aval):
        if not any(nonzero(a.off) for a in args):
            return None, frozenset()
        name, shape = eqn.primitive.name, aval.shape[-1:]
        src = frozenset().union(*(a.src for a in args))
        offs = [np.broadcast_to(a.off, shape) if nonzero(a.off) else np.zeros(shape) for a in args]
        if name in ("add", "sub", "add_any") and len(args) == 2:
            sign = -1.0 if name == "sub" else 1.0
            for i in (0, 1):  # one operand brings the offset, the other is a bias or mean leaf that takes it
                if not nonzero(args[1 - i].off) and self._absorb(args[1 - i], args[i], shape, sign):
                    return None, frozenset()
            return offs[0] + sign * offs[1], src
        if name in CASTS:
            return offs[0], src
        if name == "neg":
            return -offs[0], src
        if name in ("mul", "div") and len(args) == 2:
            i = 0 if nonzero(args[0].off) else 1
            other = np.broadcast_to(args[1 - i].const, shape)
            if not nonzero(args[1 - i].off) and args[1 - i].pattern is None and (name == "mul" or i == 0):
                moved = offs[i] != 0
                if np.all(~np.isnan(other[moved])):
                    with np.errstate(all="ignore"):
                        scaled = offs[i] * other if name == "mul" else offs[i] / other
                    return np.where(moved, scaled, 0.0), src
        for a in args:
            self._lose(a, name)
        return None, frozenset()

    def _absorb(self, leaf_arg: Val, off_arg: Val, shape, sign: float) -> bool:
        """Fold `off_arg`'s offset into the bias-like leaf it is added to (or that is subtracted)."""
        i = leaf_arg.leaf
        if i is None or self.uses.get(i, 0) != 1:
            return False
        leaf = self.leaves[i]
        if leaf.value.ndim != 1 or leaf.value.shape != tuple(shape):
            return False
        self.out.adjust[i] = self.out.adjust.get(i, 0.0) + sign * np.broadcast_to(off_arg.off, shape)
        self.out.absorbed.append("/".join(leaf.path))
        return True

    # -- layers --------------------------------------------------------------------------------------------
    def _conv(self, eqn, args):
        lhs, rhs = args
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        nd = len(eqn.invars[0].aval.shape)
        if lhs_spec[1] != nd - 1 or out_spec[1] != nd - 1 or p["batch_group_count"] != 1:
            return None
        coverage = window_coverage(eqn, lhs_spec[2:], rhs_spec[2:], out_spec[2:], p, eqn.invars[1].aval.shape)
        groups = p["feature_group_count"]
        return self._layer(eqn, lhs, rhs, "conv", rhs_spec[1], rhs_spec[0], coverage, groups)

    def _dot(self, eqn, args):
        lhs, rhs = args
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs_nd, rhs_nd = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
        if lb or rb or tuple(lc) != (lhs_nd - 1,) or rhs_nd != 2 or len(rc) != 1:
            return None
        return self._layer(eqn, lhs, rhs, "dense", rc[0], 1 - rc[0], np.ones((1, 1)))

    def _layer(self, eqn, lhs: Val, rhs: Val, kind, in_axis, out_axis, coverage, groups=1):
        if rhs.leaf is None or self.leaves[rhs.leaf].value.shape != eqn.invars[1].aval.shape:
            return None
        leaf = self.leaves[rhs.leaf]
        width_in, width_out = leaf.value.shape[in_axis], leaf.value.shape[out_axis]
        depthwise = groups > 1 and width_in == 1
        if depthwise:  # output o reads input o // multiplier: they go together
            self.graph.union(np.repeat(lhs.nodes, width_out // groups), leaf.axes[out_axis])
        else:  # kernel position k reads input k + g * width_in of every group g; outputs stay per-group equal
            per_group = width_out // groups
            for g in range(groups):
                self.graph.union(leaf.axes[in_axis], lhs.nodes[g * width_in:(g + 1) * width_in])
                if g:
                    self.graph.union(leaf.axes[out_axis][:per_group],
                                     leaf.axes[out_axis][g * per_group:(g + 1) * per_group])
        layer = self.out.layers.setdefault(
            rhs.leaf, Layer(leaf.module, rhs.leaf, kind, in_axis, out_axis, groups, depthwise)
        )
        if not depthwise:
            layer.exits.append((lhs.nodes, ~np.isnan(lhs.const)))
        out = Val(leaf.axes[out_axis], self._nan(eqn.outvars[0].aval))
        if self.removed is not None:
            self._fold(layer, leaf, lhs, out, coverage)
        return [out]

    def _fold(self, layer: Layer, leaf: Leaf, lhs: Val, out: Val, coverage) -> None:
        """What removing the gone inputs takes from this layer's output: a carrier's kernel change (exact
        mode, where an offset would not stay uniform), else an offset on the output."""
        gone = self.gone[lhs.nodes]
        if not layer.depthwise and np.any(gone & np.isnan(lhs.const)):
            self.out.unfoldable.update(self.graph.roots(lhs.nodes[gone & np.isnan(lhs.const)]).tolist())
        own = np.zeros_like(gone) if layer.depthwise else gone  # depthwise: a gone input feeds gone outputs
        removed = np.where(own, np.nan_to_num(lhs.const), 0.0)
        offset = np.where(gone, 0.0, lhs.off) if nonzero(lhs.off) else np.zeros(len(lhs.nodes))
        if not (np.any(removed != 0) or np.any(offset != 0)):
            return
        exact = self.carriers is not None
        needs_carrier = np.any(coverage != 1) or lhs.pattern is not None or layer.kernel in self.force
        if needs_carrier and exact:
            if lhs.pattern is not None and np.any(offset != 0):
                self.out.force.update(lhs.src)  # a uniform offset cannot ride on a patterned carrier
                offset = np.zeros_like(offset)
            if np.any(removed != 0) or np.any(offset != 0):
                carrier = self._carrier(layer, lhs, gone) if layer.groups == 1 else None
                if carrier is not None:
                    delta = carrier_delta(leaf.value, layer.in_axis, removed + offset, carrier,
                                          lhs.const[carrier])
                    self.out.adjust[layer.kernel] = self.out.adjust.get(layer.kernel, 0.0) + delta
                    if np.any(delta != 0):
                        self.out.carried[layer.kernel] = carrier
                    return
                if np.any(removed != 0) and layer.kernel not in self.out.requests:  # no carrier possible
                    keep = gone & (np.nan_to_num(lhs.const) != 0)
                    self.out.unfoldable.update(self.graph.roots(lhs.nodes[keep]).tolist())
                if np.any(offset != 0):
                    self.out.force.update(lhs.src)
        elif needs_carrier:
            self.out.approximate.append(layer.name)
        scale = float(np.mean(lhs.pattern)) if lhs.pattern is not None else 1.0
        off = ((removed * scale + offset) @ self._taps(layer, leaf, coverage))
        out.off = np.where(self.gone[out.nodes], 0.0, off)
        out.src = lhs.src | {layer.kernel}

    def _taps(self, layer: Layer, leaf: Leaf, coverage) -> np.ndarray:
        """(input channel, output channel) sums of the kernel taps, weighted by coverage (block diagonal
        over the groups of a grouped conv)."""
        kernel = leaf.value.astype(np.float64) * coverage
        kernel = np.moveaxis(kernel, (layer.in_axis, layer.out_axis), (-2, -1))
        taps = kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)
        if layer.groups == 1:
            return taps
        width_in, width_out = taps.shape
        per_group = width_out // layer.groups
        full = np.zeros((width_in * layer.groups, width_out))
        for g in range(layer.groups):
            cols = slice(g * per_group, (g + 1) * per_group)
            full[g * width_in:(g + 1) * width_in, cols] = taps[:, cols]
        return full

    def _carrier(self, layer: Layer, lhs: Val, gone: np.ndarray) -> int | None:
        """The input position of this conv's carrier: the one given, else a kept input that is constant (a
        scale-0 channel kept anyway: no extra channel); else None, and a request for the removed channel of
        largest |constant| to be kept as the carrier."""
        kernel = layer.kernel
        if self.uses.get(kernel, 0) != 1:  # (a kernel applied twice: no carrier)
            return None
        if kernel in self.carriers:
            return self.carriers[kernel][0]
        size = np.where(np.isnan(lhs.const), 0.0, np.abs(lhs.const))
        if np.any(~gone & (size > 0)):
            return int(np.argmax(np.where(gone, 0.0, size)))
        if np.any(size > 0):
            j = int(np.argmax(size))
            self.out.requests[kernel] = (j, int(self.graph.roots(lhs.nodes[j : j + 1])[0]))
        return None
