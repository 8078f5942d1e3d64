"""FLOPs of one forward pass per example, counted from its jaxpr in two conventions.

- `xla`: what XLA's HLO cost analysis reports for the lowered program on one example (the report's
  `flops_before` / `flops_after`): a multiply-add is 2 FLOPs, conv taps that fall on zero padding are
  skipped, every elementwise op (BN, ReLU, adds) counts one per element, transcendentals (exp, rsqrt)
  none, a reduction (n - 1) per output. The common ops are counted here by those rules; any other op is
  lowered alone once per shape and XLA's own count taken (tests check the sum against whole programs).
- `papers`: Network Slimming's `compute_flops` (the report's `flops_ns_before` / `flops_ns_after`): per
  conv output 2 * (kernel taps * input channels per group) plus 1 with a bias, padding taps included; per
  Dense output 2 * inputs + 1; a BatchNorm 2 per input element, a ReLU 1 per element, a pool (window or
  global) its window size per output. VGG-19 on a 32x32 input is 7.97e8 (NS's Table 1).

Ops on the input batch are divided by its size, so any probe batch gives per-example counts.
"""

import functools
import math

import jax
import jax.extend.core as jcore
import numpy as np

from palm_jax.pruning.evaluate import inner
from palm_jax.pruning.values import window_coverage

PER_ELEMENT = frozenset([
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "convert_element_type", "abs", "sign",
    "eq", "ne", "gt", "ge", "lt", "le", "square",
])
FREE = frozenset([
    "exp", "log", "rsqrt", "sqrt", "tanh", "broadcast_in_dim", "reshape", "squeeze", "expand_dims",
    "transpose", "concatenate", "slice", "gather", "pad", "iota", "copy", "copy_p", "optimization_barrier",
])
VIEWS = frozenset(["broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "expand_dims"])
CALLED = frozenset(["jit", "pjit", "closed_call", "core_call"])  # lowered as a call to its own function
INLINED = frozenset(["jit", "pjit"])  # calls that `jax.disable_jit()` traces inline
DERIVATIVES = frozenset(["custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"])
FOLDED = PER_ELEMENT | {"select_n", "integer_pow"}  # on constants alone, XLA folds these (0 FLOPs)


def _size(var) -> int:
    return math.prod(var.aval.shape)


def _xla(eqn) -> float:
    name = eqn.primitive.name
    if name in FREE:
        return 0.0
    if name in PER_ELEMENT or (name == "select_n" and len(eqn.invars) == 3) or (
        name == "integer_pow" and eqn.params["y"] == 2
    ):
        return float(_size(eqn.outvars[0]))
    if name in ("reduce_sum", "reduce_max", "reduce_min"):
        return float(_size(eqn.invars[0]) - _size(eqn.outvars[0]))
    if name.startswith("reduce_window_"):
        return float(_size(eqn.outvars[0]) * (math.prod(eqn.params["window_dimensions"]) - 1))
    if name == "conv_general_dilated":
        return 2.0 * _valid_taps(eqn) * _conv_channels(eqn)
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        contracted = math.prod(eqn.invars[0].aval.shape[i] for i in lc)
        return 2.0 * _size(eqn.outvars[0]) * contracted
    return _lowered(eqn.primitive, _freeze(eqn.params), tuple(
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars))


def _freeze(params):
    return tuple(sorted((k, v if _hashable(v) else repr(v)) for k, v in params.items()))


def _hashable(v) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=512)
def _lowered(primitive, params, avals) -> float:
    """XLA's count for one equation, lowered alone."""
    kwargs = dict(params)
    cost = jax.jit(lambda *a: primitive.bind(*a, **kwargs)).lower(*avals).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


def _conv_channels(eqn) -> int:
    """Multiply-adds per (output position, kernel tap): input channels per group times output channels."""
    rhs_spec = eqn.params["dimension_numbers"][1]
    shape = eqn.invars[1].aval.shape
    return shape[rhs_spec[0]] * shape[rhs_spec[1]]


def _valid_taps(eqn) -> float:
    """Sum over output positions (all batch rows) of the kernel taps that read the input, not padding."""
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    kernel = eqn.invars[1].aval.shape
    cover = window_coverage(eqn, lhs_spec[2:], rhs_spec[2:], out_spec[2:], p, kernel)
    out = eqn.outvars[0].aval.shape
    positions = out[out_spec[0]] * math.prod(out[d] for d in out_spec[2:])
    return float(np.sum(cover)) * positions


def _view(views, var):
    return None if isinstance(var, jcore.Literal) else views.get(var)


def _is_zero(var) -> bool:
    return isinstance(var, jcore.Literal) and np.size(var.val) == 1 and float(np.asarray(var.val)) == 0.0


def _papers(eqn, views, hit, bn_means, biased) -> float:
    name = eqn.primitive.name
    out = _size(eqn.outvars[0]) if eqn.outvars else 0
    if name == "conv_general_dilated":
        out_spec = eqn.params["dimension_numbers"][2]
        channels = eqn.outvars[0].aval.shape[out_spec[1]]
        taps = math.prod(eqn.invars[1].aval.shape) // channels  # kernel taps * input channels per group
        return float(out * (2 * taps + (_view(views, eqn.invars[1]) in biased)))
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        contracted = math.prod(eqn.invars[0].aval.shape[i] for i in lc)
        return float(out * (2 * contracted + (_view(views, eqn.invars[1]) in biased)))
    if not hit:
        return 0.0
    if name == "sub" and any(_view(views, v) in bn_means for v in eqn.invars):
        return 2.0 * out  # a BatchNorm applied: 2 per input element
    if name == "max" and any(_is_zero(v) for v in eqn.invars):
        return float(out)  # ReLU
    if name.startswith("reduce_window_"):
        return float(out * math.prod(eqn.params["window_dimensions"]))
    if name == "reduce_sum" and len(eqn.invars[0].aval.shape) - 1 not in eqn.params["axes"]:
        return float(_size(eqn.invars[0]))  # a global pool
    return 0.0


def inlining_keeps_count(jaxpr) -> bool:
    """Whether the same function traced under `jax.disable_jit()` counts the same in both conventions: its
    only nested jaxprs are custom derivatives and jits, each jit with at most one equation XLA may count
    (summed inline or as a call, it rounds alike). Loops, conditionals, checkpoints and other transforms
    (which `disable_jit` unrolls or rewrites) make it False."""
    for eqn in jaxpr.eqns:
        sub, name = inner(eqn), eqn.primitive.name
        if sub is None:
            if any(_holds_jaxpr(p) for p in eqn.params.values()):
                return False  # a loop, conditional or other transform
            continue
        if name not in INLINED | DERIVATIVES or not inlining_keeps_count(sub[0]):
            return False
        counted = [e for e in sub[0].eqns if inner(e) is not None or e.primitive.name not in FREE]
        if name in INLINED and len(counted) > 1:
            return False
    return True


def _holds_jaxpr(param) -> bool:
    if isinstance(param, tuple | list):
        return any(_holds_jaxpr(p) for p in param)
    return isinstance(param, jcore.Jaxpr | jcore.ClosedJaxpr)


def count(closed, n_leaves: int, paths) -> dict:
    """{"xla": ..., "papers": ...} FLOPs per example of the forward pass `closed` (leaves, then inputs)."""
    jaxpr = closed.jaxpr
    inputs = jaxpr.invars[n_leaves:]
    batch = inputs[0].aval.shape[0] if inputs and inputs[0].aval.shape else 1
    modules = ["/".join(p[1:-1]) for p in paths]
    bn_means = {i for i, p in enumerate(paths) if p[0] == "batch_stats" and p[-1] == "mean"}
    kernels_with_bias = {modules[i] for i, p in enumerate(paths) if p[0] == "params" and p[-1] == "bias"}
    biased = {i for i, p in enumerate(paths) if p[-1] == "kernel" and modules[i] in kernels_with_bias}
    views = dict(zip(jaxpr.invars[:n_leaves], range(n_leaves), strict=True))
    papers = [0.0]
    static = set(jaxpr.constvars)
    _, amounts = _walk(jaxpr, set(inputs), views, papers, batch, bn_means, biased, static)
    return {"xla": float(_in_xla_order(jaxpr, amounts, np.float32(0))), "papers": papers[0]}


def _walk(jaxpr, tainted, views, papers, batch, bn_means, biased, static):
    """(tainted vars, per equation its XLA count or, for a call, (kind, inner jaxpr, inner amounts)).
    `static` holds the vars computed from constants alone: XLA folds elementwise ops on them."""
    amounts = []
    is_static = lambda v: isinstance(v, jcore.Literal) or v in static
    for eqn in jaxpr.eqns:
        hit = any(not isinstance(v, jcore.Literal) and v in tainted for v in eqn.invars)
        sub = inner(eqn)
        if sub is not None:
            inner_jaxpr = sub[0]
            pairs = list(zip(inner_jaxpr.invars, eqn.invars, strict=True))
            inner_taint = {iv for iv, ov in pairs if not isinstance(ov, jcore.Literal) and ov in tainted}
            inner_views = {iv: _view(views, ov) for iv, ov in pairs if _view(views, ov) is not None}
            inner_static = set(sub[0].constvars) | {iv for iv, ov in pairs if is_static(ov)}
            out_taint, sub_amounts = _walk(inner_jaxpr, inner_taint, inner_views, papers, batch, bn_means,
                                           biased, inner_static)
            tainted.update(ov for iv, ov in zip(inner_jaxpr.outvars, eqn.outvars, strict=True)
                           if iv in out_taint)
            kind = "call" if eqn.primitive.name in CALLED else "inline"
            amounts.append((kind, inner_jaxpr, sub_amounts))
            continue
        scale = 1.0 / batch if hit else 1.0
        folded = all(is_static(v) for v in eqn.invars)
        if folded:
            static.update(eqn.outvars)
        amounts.append(0.0 if folded and eqn.primitive.name in FOLDED else _xla(eqn) * scale)
        papers[0] += _papers(eqn, views, hit, bn_means, biased) * scale
        if hit:
            tainted.update(eqn.outvars)
        if eqn.primitive.name in VIEWS and _view(views, eqn.invars[0]) is not None:
            views[eqn.outvars[0]] = views[eqn.invars[0]]
    return tainted, amounts


def _in_xla_order(jaxpr, amounts, total):
    """Sum the equations' counts as XLA's cost analysis does: in float32, in post-order from the outputs
    (operands first, in order), a called function's count summed on its own first."""
    producer = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars
                if not isinstance(v, jcore.DropVar)}
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jcore.Literal)}
    ends = [i for i, eqn in enumerate(jaxpr.eqns) if not any(v in used for v in eqn.outvars)]
    done = set()
    for start in [*(producer[v] for v in jaxpr.outvars if not isinstance(v, jcore.Literal) and v in producer),
                  *ends]:
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if i in done:
                continue
            if not expanded:
                stack.append((i, True))
                for v in reversed(jaxpr.eqns[i].invars):
                    j = None if isinstance(v, jcore.Literal) else producer.get(v)
                    if j is not None and j not in done:
                        stack.append((j, False))
                continue
            done.add(i)
            amount = amounts[i]
            if isinstance(amount, tuple):
                kind, sub, sub_amounts = amount
                if kind == "call":
                    total = np.float32(total + _in_xla_order(sub, sub_amounts, np.float32(0)))
                else:
                    total = _in_xla_order(sub, sub_amounts, total)
            else:
                total = np.float32(total + np.float32(amount))
    return total
