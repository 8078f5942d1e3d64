"""Walk the jaxpr of `model.apply(variables, x, train=False)` and follow every channel axis.

Every value with rank >= 1 carries, for each position of its last axis,
- a channel node (`ChannelGraph`): elementwise ops unite their operands' nodes, a conv or Dense ties its
  kernel's input axis to the nodes it reads and outputs its kernel's output-axis nodes, a concatenation on
  the last axis concatenates node lists, pools / spatial reductions / flattens keep or tile them. Any op that
  mixes or moves the channel axis in another way pins what it touches (never sliced);
- the value, where it is constant over all other axes (NaN elsewhere), computed from the variables: a BN
  with scale 0 makes `(x - mean) * 0 + bias` constant, and ReLU / pools keep it so;
- the offset the pruned network lacks there (folding walk only): removing channel p from a conv or Dense
  input removes `value[p] * sum(kernel taps)` from its output (taps weighted by how often they read the input
  rather than zero padding). Offsets pass through linear ops (adds, scalings, pools, later convs) and are
  absorbed by the first bias or BN running mean they are added to or subtracted from; what reaches a
  nonlinearity or an output is reported as unabsorbed.
Next to zero padding a per-channel offset is only the closest constant. With `carriers` (a dict, exact
mode) such a conv instead keeps one removed input channel with a nonzero constant, the carrier, whose kernel
slice takes over what the removed constants brought (`carrier_delta`): the walk asks for one in
`Walk.requests` (kernel leaf -> (input position, class root)) and the next walk, given it, uses it.
"""

import math
from dataclasses import dataclass, field

import jax.extend.core as jcore
import numpy as np

from palm_jax.pruning.graph import ChannelGraph, Layer, Leaf
from palm_jax.pruning.values import Val, carrier_delta, const_of, elementwise_const, nonzero, window_coverage

ELEMENTWISE = frozenset([
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1", "rsqrt",
    "sqrt", "cbrt", "tanh", "logistic", "abs", "sign", "integer_pow", "pow", "square", "erf", "erfc",
    "erf_inv", "convert_element_type", "copy", "copy_p", "select_n", "clamp", "eq", "ne", "gt", "ge",
    "lt", "le", "and", "or", "not", "xor", "floor", "ceil", "round", "is_finite", "nextafter", "rem",
    "sin", "cos", "tan", "atan2", "reduce_precision", "add_any",
])
# Call-like primitives whose inner jaxpr runs once on the operands: walked into.
CALLS = frozenset([
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
])
RESHAPES = frozenset(["broadcast_in_dim", "reshape", "squeeze", "expand_dims"])
# Ops through which a value is still its leaf (reshaped, broadcast or cast), and how offsets pass them.
CASTS = frozenset(["convert_element_type", "copy", "copy_p", "reduce_precision"])
REDUCE_SCALE = {"reduce_sum": "count", "reduce_max": "same", "reduce_min": "same"}
WINDOW_SCALE = {"reduce_window_sum": "count", "reduce_window_max": "same", "reduce_window_min": "same"}


@dataclass
class Walk:
    """What one walk found; `adjust` maps a leaf index to the amount added to it by folding."""

    layers: dict = field(default_factory=dict)
    uses: dict = field(default_factory=dict)
    adjust: dict = field(default_factory=dict)
    absorbed: list = field(default_factory=list)
    unabsorbed: list = field(default_factory=list)
    approximate: list = field(default_factory=list)
    carried: list = field(default_factory=list)
    requests: dict = field(default_factory=dict)
    unfoldable: set = field(default_factory=set)


def _last(aval) -> int | None:
    return aval.shape[-1] if aval.shape else None


class Walker:
    """One walk over the traced forward pass. `removed` (a set of class roots) turns on folding."""

    def __init__(self, graph: ChannelGraph, leaves: list[Leaf], removed: set | None = None, uses=None,
                 carriers: dict | None = None):
        self.graph, self.leaves, self.removed = graph, leaves, removed
        self.uses = uses or {}  # consumers per leaf, counted by the first walk (a bias must have one)
        self.carriers = carriers  # None: approximate folding next to padding
        self.out = Walk()

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
        return Val(nodes, const_of(np.asarray(value)))

    def _leaf_val(self, i: int) -> Val:
        leaf = self.leaves[i]
        nodes = leaf.axes[-1] if leaf.value.ndim else None
        return Val(nodes, const_of(leaf.value), leaf=i)

    def _fresh(self, aval, *, pinned=False):
        return self.graph.fresh(aval.shape[-1], pinned=pinned) if aval.shape else None

    @staticmethod
    def _nan(aval) -> np.ndarray:
        return np.full(aval.shape[-1:], np.nan)

    def _lose(self, val: Val, where: str) -> None:
        if self.removed is not None and nonzero(val.off):
            self.out.unabsorbed.append(
                {"at": where, "from": sorted(val.src), "max_abs": float(np.max(np.abs(val.off)))}
            )

    def _use(self, args, outs) -> None:
        kept = {o.leaf for o in outs}
        for a in args:
            if a.leaf is not None and a.leaf not in kept:
                self.out.uses[a.leaf] = self.out.uses.get(a.leaf, 0) + 1

    # -- rules ---------------------------------------------------------------------------------------------
    def _eqn(self, eqn, args: list[Val]) -> list[Val]:
        name = eqn.primitive.name
        if name in CALLS:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if sub is not None:
                inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
                if len(inner.invars) == len(args):
                    return self._jaxpr(inner, consts, args)
        if name == "optimization_barrier":
            return list(args)
        rule = {
            "concatenate": self._concatenate,
            "slice": self._slice,
            "pad": self._pad,
            "transpose": self._transpose,
            "conv_general_dilated": self._conv,
            "dot_general": self._dot,
        }.get(name)
        if name in RESHAPES:
            rule = self._reshape
        elif name in ELEMENTWISE:
            rule = self._elementwise
        elif name in REDUCE_SCALE:
            rule = self._reduce
        elif name in WINDOW_SCALE:
            rule = self._window
        out = rule(eqn, args) if rule is not None else None
        out = out if out is not None else self._pin(eqn, args)
        self._use(args, out)
        return out

    def _pin(self, eqn, args) -> list[Val]:
        """Unknown op: nothing it touches can be sliced, nothing it outputs is constant."""
        for a in args:
            self.graph.pin(a.nodes)
            self._lose(a, eqn.primitive.name)
        return [Val(self._fresh(v.aval, pinned=True), self._nan(v.aval)) for v in eqn.outvars]

    def _elementwise(self, eqn, args):
        name, aval = eqn.primitive.name, eqn.outvars[0].aval
        width = _last(aval)
        if width is None:
            nodes = None
        else:
            full = [a.nodes for a, v in zip(args, eqn.invars, strict=True) if _last(v.aval) == width]
            nodes = full[0] if full else self.graph.fresh(width)
            for other in full[1:]:
                self.graph.union(nodes, other)
        const = elementwise_const(eqn, args, aval)
        leaf = args[0].leaf if name in CASTS else None
        off, src = self._elementwise_off(eqn, args, aval)
        return [Val(nodes, const, leaf, off, src)]

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
            if not nonzero(args[1 - i].off) and (name == "mul" or i == 0):
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

    def _reshape(self, eqn, args):
        """reshape, broadcast_in_dim, squeeze, expand_dims: keep, broadcast or tile (flatten) the channels."""
        a = args[0]
        src_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if not out_shape:
            return [Val(None, np.asarray(a.const).reshape(-1)[0])]
        width = out_shape[-1]
        if eqn.primitive.name == "broadcast_in_dim" and src_shape:
            if eqn.params["broadcast_dimensions"][-1] != len(out_shape) - 1:
                return None  # the channel axis moves: pin
            if src_shape[-1] != width:  # a size-1 last axis broadcast to `width` positions
                off = np.broadcast_to(a.off, (width,)).copy() if nonzero(a.off) else None
                return [Val(self.graph.fresh(width), np.repeat(a.const, width), None, off, a.src)]
        if not src_shape:
            off = np.full(width, float(a.off)) if nonzero(a.off) else None
            return [Val(self.graph.fresh(width), np.full(width, float(a.const)), None, off, a.src)]
        if src_shape[-1] == width:
            leaf = a.leaf if math.prod(src_shape[:-1]) == 1 else None  # a vector, reshaped or broadcast
            return [Val(a.nodes, a.const, leaf, a.off, a.src)]
        for k in range(len(src_shape) - 2, -1, -1):  # a flatten merging trailing axes into the last one
            merged = math.prod(src_shape[k:])
            if merged == width:
                rep = width // src_shape[-1]
                off = np.tile(a.off, rep) if nonzero(a.off) else None
                return [Val(np.tile(a.nodes, rep), np.tile(a.const, rep), None, off, a.src)]
            if merged > width:
                break
        return None

    def _concatenate(self, eqn, args):
        aval = eqn.outvars[0].aval
        if eqn.params["dimension"] == len(aval.shape) - 1:
            nodes = np.concatenate([a.nodes for a in args])
            const = np.concatenate([a.const for a in args])
            offs = [a.off if nonzero(a.off) else np.zeros(len(a.nodes)) for a in args]
            off = np.concatenate(offs) if any(nonzero(a.off) for a in args) else None
            return [Val(nodes, const, None, off, frozenset().union(*(a.src for a in args)))]
        for a in args[1:]:
            self.graph.union(args[0].nodes, a.nodes)
        same = all(np.array_equal(a.const, args[0].const) for a in args)
        const = args[0].const if same else self._nan(aval)
        if any(nonzero(a.off) for a in args):
            for a in args:
                self._lose(a, "concatenate")
        return [Val(args[0].nodes, const)]

    def _slice(self, eqn, args):
        a, p = args[0], eqn.params
        stride = (p["strides"] or (1,) * len(p["start_indices"]))[-1]
        cut = slice(p["start_indices"][-1], p["limit_indices"][-1], stride)
        off = a.off[cut] if nonzero(a.off) else None
        return [Val(a.nodes[cut], a.const[cut], None, off, a.src)]

    def _pad(self, eqn, args):
        a = args[0]
        config = eqn.params["padding_config"]
        if tuple(config[-1]) != (0, 0, 0):
            return None
        if any(tuple(c) != (0, 0, 0) for c in config) and (
            nonzero(a.off) or np.any(np.nan_to_num(a.const) != 0)
        ):
            self.out.approximate.append("pad")
        return [Val(a.nodes, a.const, None, a.off, a.src)]

    def _transpose(self, eqn, args):
        perm = eqn.params["permutation"]
        if perm[-1] != len(perm) - 1:
            return None
        a = args[0]
        return [Val(a.nodes, a.const, None, a.off, a.src)]

    def _reduce(self, eqn, args):
        a, axes, shape = args[0], eqn.params["axes"], eqn.invars[0].aval.shape
        if len(shape) - 1 in axes:
            return None
        count = math.prod(shape[i] for i in axes) if REDUCE_SCALE[eqn.primitive.name] == "count" else 1
        off = a.off * count if nonzero(a.off) else None
        return [Val(a.nodes, a.const * count, None, off, a.src)]

    def _window(self, eqn, args):
        a, p = args[0], eqn.params
        dims = p["window_dimensions"]
        if dims[-1] != 1 or p["window_strides"][-1] != 1 or tuple(p["padding"][-1]) != (0, 0):
            return None
        if p["base_dilation"][-1] != 1 or p["window_dilation"][-1] != 1:
            return None
        if WINDOW_SCALE[eqn.primitive.name] == "count":  # sum pool: scale by the mean number of taps read
            axes = list(range(len(dims)))
            count = float(np.sum(window_coverage(eqn, axes, axes, axes, p, dims)))
            if count != math.prod(dims) and (nonzero(a.off) or np.any(np.nan_to_num(a.const) != 0)):
                self.out.approximate.append(eqn.primitive.name)
        else:  # max / min pool: a constant stays itself (padding is -inf / +inf)
            count = 1.0
        off = a.off * count if nonzero(a.off) else None
        return [Val(a.nodes, a.const * count, None, off, a.src)]

    # -- layers --------------------------------------------------------------------------------------------
    def _conv(self, eqn, args):
        lhs, rhs = args
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        nd = len(eqn.invars[0].aval.shape)
        if lhs_spec[1] != nd - 1 or out_spec[1] != nd - 1 or p["feature_group_count"] != 1:
            return None
        if p["batch_group_count"] != 1:
            return None
        coverage = window_coverage(eqn, lhs_spec[2:], rhs_spec[2:], out_spec[2:], p, eqn.invars[1].aval.shape)
        return self._layer(eqn, lhs, rhs, "conv", rhs_spec[1], rhs_spec[0], coverage)

    def _dot(self, eqn, args):
        lhs, rhs = args
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs_nd, rhs_nd = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
        if lb or rb or tuple(lc) != (lhs_nd - 1,) or rhs_nd != 2 or len(rc) != 1:
            return None
        return self._layer(eqn, lhs, rhs, "dense", rc[0], 1 - rc[0], np.ones((1, 1)))

    def _layer(self, eqn, lhs: Val, rhs: Val, kind, in_axis, out_axis, coverage):
        if rhs.leaf is None or self.leaves[rhs.leaf].value.shape != eqn.invars[1].aval.shape:
            return None
        leaf = self.leaves[rhs.leaf]
        self.graph.union(leaf.axes[in_axis], lhs.nodes)
        layer = self.out.layers.setdefault(
            rhs.leaf, Layer(leaf.module, rhs.leaf, kind, in_axis, out_axis)
        )
        layer.exits.append((lhs.nodes, ~np.isnan(lhs.const)))
        out = Val(leaf.axes[out_axis], self._nan(eqn.outvars[0].aval))
        if self.removed is None:
            return [out]
        gone = np.isin(self.graph.roots(lhs.nodes), list(self.removed))
        if np.any(gone & np.isnan(lhs.const)):
            self.out.unfoldable.update(self.graph.roots(lhs.nodes[gone & np.isnan(lhs.const)]).tolist())
        deficit = np.where(gone, np.nan_to_num(lhs.const), 0.0)
        if nonzero(lhs.off):
            deficit = deficit + np.where(gone, 0.0, lhs.off)
        if np.any(deficit != 0):
            if np.any(coverage != 1):
                carrier = self._carrier(rhs.leaf, lhs, gone)
                if carrier is not None:
                    delta = carrier_delta(leaf.value, in_axis, deficit, carrier, lhs.const[carrier])
                    self.out.adjust[rhs.leaf] = self.out.adjust.get(rhs.leaf, 0.0) + delta
                    self.out.carried.append(layer.name)
                    return [out]
                self.out.approximate.append(layer.name)
            kernel = np.moveaxis(leaf.value.astype(np.float64) * coverage, (in_axis, out_axis), (-2, -1))
            taps = kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)
            out.off, out.src = deficit @ taps, lhs.src | {layer.name}
        return [out]

    def _carrier(self, kernel: int, lhs: Val, gone: np.ndarray) -> int | None:
        """The input position of this conv's carrier: the one given, else a kept input that is constant (a
        scale-0 channel kept anyway: no extra channel); else None, and a request for the removed channel of
        largest |constant| to be kept as the carrier."""
        if self.carriers is None or self.uses.get(kernel, 0) != 1:  # (a kernel applied twice: approximate)
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
