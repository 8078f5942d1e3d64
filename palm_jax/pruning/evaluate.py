"""Evaluate a jaxpr in NumPy float64: the pruner's exactness check, without compiling anything.

`run(closed, args)` interprets a closed jaxpr equation by equation. Floating values are float64 throughout
and casts to a lower float precision are skipped, so comparing two models this way measures their
difference alone (no float32 or bfloat16 rounding); integer and boolean values keep their dtypes. The
common primitives of CNNs have NumPy rules here (convolutions as one matrix product per kernel tap);
anything else runs through JAX itself, eagerly (in float32). `apply(eqn, args)` evaluates one equation
(the walks use it to fold constant index arrays).
"""

import functools
import itertools
import math

import numpy as np

# The common elementwise ops, in NumPy.
NUMPY = {
    "add": np.add, "add_any": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "max": np.maximum, "min": np.minimum, "neg": np.negative, "exp": np.exp, "exp2": np.exp2, "log": np.log,
    "log1p": np.log1p,
    "expm1": np.expm1, "sqrt": np.sqrt, "rsqrt": lambda a: 1 / np.sqrt(a), "cbrt": np.cbrt, "tanh": np.tanh,
    "logistic": lambda a: 1 / (1 + np.exp(-a)), "abs": np.abs, "sign": np.sign, "square": np.square,
    "floor": np.floor, "ceil": np.ceil, "is_finite": np.isfinite, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "atan2": np.arctan2, "pow": np.power, "rem": np.fmod, "nextafter": np.nextafter,
    "eq": np.equal, "ne": np.not_equal, "gt": np.greater, "ge": np.greater_equal, "lt": np.less,
    "le": np.less_equal, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
    "not": np.invert, "copy": np.copy, "copy_p": np.copy, "reduce_precision": np.asarray,
}
# Call-like primitives whose inner jaxpr runs once on the operands.
CALLS = frozenset([
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
])
REDUCE = {"reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
          "reduce_and": np.all, "reduce_or": np.any}
WINDOW = {"reduce_window_sum": (np.add, 0.0), "reduce_window_max": (np.maximum, -np.inf),
          "reduce_window_min": (np.minimum, np.inf)}


def inner(eqn):
    """(jaxpr, consts) of a call-like equation whose inner jaxpr takes exactly its operands, else None."""
    if eqn.primitive.name not in CALLS:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
    if sub is None:
        return None
    jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
    return (jaxpr, consts) if len(jaxpr.invars) == len(eqn.invars) else None


@functools.cache
def is_float(dtype) -> bool:
    """Floating point, bfloat16 and the other ml_dtypes included (NumPy's own test misses those)."""
    from jax import numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def as_float64(value) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype == np.float64 or not is_float(value.dtype):
        return value
    return value.astype(np.float64)


def run(closed, args) -> list[np.ndarray]:
    """The outputs of a closed jaxpr on `args`, in float64."""
    return run_jaxpr(closed.jaxpr, closed.consts, args)


def run_jaxpr(jaxpr, consts, args) -> list[np.ndarray]:
    env = {}
    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = as_float64(value)
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = as_float64(value)
    read = lambda v: as_float64(v.val) if hasattr(v, "val") else env[v]
    for eqn in jaxpr.eqns:
        outs = apply(eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def apply(eqn, args: list[np.ndarray]) -> list[np.ndarray]:
    """One equation on NumPy operands."""
    name, p = eqn.primitive.name, eqn.params
    sub = inner(eqn)
    if sub is not None:
        return run_jaxpr(sub[0], sub[1], args)
    rule = RULES.get(name)
    if rule is None and name in NUMPY:
        rule = _elementwise
    out = rule(eqn, *args) if rule is not None else None
    if out is None:  # no NumPy rule (or an unusual form): JAX itself, eagerly
        import jax.numpy as jnp

        out = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **p)
    outs = list(out) if eqn.primitive.multiple_results else [out]
    return [as_float64(o) for o in outs]


def _elementwise(eqn, *args):
    name = eqn.primitive.name
    if name == "div":
        a, b = args
        if np.issubdtype(np.result_type(a, b), np.integer):
            return np.trunc(a / b).astype(np.result_type(a, b))  # C-like integer division
        return np.divide(a, b)
    with np.errstate(all="ignore"):
        return NUMPY[name](*args)


def _convert(eqn, x):
    dtype = np.dtype(eqn.params["new_dtype"])
    return x.astype(np.float64) if is_float(dtype) else x.astype(dtype)


def _integer_pow(eqn, x):
    return x ** eqn.params["y"]


def _round(eqn, x):
    if int(eqn.params.get("rounding_method", 0)) == 0:  # away from zero
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    return np.round(x)


def _select_n(eqn, which, *cases):
    return np.choose(np.asarray(which, dtype=np.int64), np.broadcast_arrays(*cases))


def _clamp(eqn, lo, x, hi):
    return np.clip(x, lo, hi)


def _broadcast_in_dim(eqn, x, *dyn):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    if dyn:
        return None
    expanded = [1] * len(shape)
    for src, dst in enumerate(dims):
        expanded[dst] = x.shape[src]
    return np.broadcast_to(x.reshape(expanded), shape)


def _reshape(eqn, x, *dyn):
    if dyn or eqn.params.get("dimensions") is not None:
        return None
    return x.reshape(eqn.params["new_sizes"])


def _squeeze(eqn, x):
    return np.squeeze(x, axis=tuple(eqn.params["dimensions"]))


def _expand_dims(eqn, x):
    return np.expand_dims(x, axis=tuple(eqn.params["dimensions"]))


def _transpose(eqn, x):
    return np.transpose(x, eqn.params["permutation"])


def _concatenate(eqn, *xs):
    return np.concatenate(xs, axis=eqn.params["dimension"])


def _slice(eqn, x):
    p = eqn.params
    strides = p["strides"] or (1,) * x.ndim
    return x[tuple(slice(a, b, s) for a, b, s in zip(p["start_indices"], p["limit_indices"], strides,
                                                       strict=True))]


def pad(x, value, config) -> np.ndarray:
    """lax.pad: (low, high, interior) per axis; negative low / high crop."""
    for axis, (low, high, interior) in enumerate(config):
        if interior:
            n = x.shape[axis]
            shape = list(x.shape)
            shape[axis] = n + (n - 1) * interior if n else 0
            spread = np.full(shape, value, dtype=x.dtype)
            index = [slice(None)] * x.ndim
            index[axis] = slice(None, None, interior + 1)
            spread[tuple(index)] = x
            x = spread
        widths = [(0, 0)] * x.ndim
        widths[axis] = (max(low, 0), max(high, 0))
        x = np.pad(x, widths, constant_values=value)
        index = [slice(None)] * x.ndim
        index[axis] = slice(max(-low, 0), x.shape[axis] - max(-high, 0))
        x = x[tuple(index)]
    return x


def _pad(eqn, x, value):
    return pad(x, value.item(), eqn.params["padding_config"])


def _iota(eqn):
    p = eqn.params
    shape, dim = p["shape"], p["dimension"]
    line = np.arange(shape[dim], dtype=np.dtype(p["dtype"]))
    return np.broadcast_to(line.reshape([-1 if i == dim else 1 for i in range(len(shape))]), shape)


def _rev(eqn, x):
    return np.flip(x, axis=tuple(eqn.params["dimensions"]))


def _reduce(eqn, x):
    return REDUCE[eqn.primitive.name](x, axis=tuple(eqn.params["axes"]))


def _argmax(eqn, x):
    (axis,) = eqn.params["axes"]
    fn = np.argmax if eqn.primitive.name == "argmax" else np.argmin
    return fn(x, axis=axis).astype(np.dtype(eqn.params["index_dtype"]))


def window(x, op, init, dims, strides, padding, base_dilation=None, window_dilation=None) -> np.ndarray:
    """lax.reduce_window of `op` (NumPy ufunc) with identity `init`, one strided slice per window tap."""
    ones = (1,) * x.ndim
    base_dilation, window_dilation = base_dilation or ones, window_dilation or ones
    x = pad(x, init, [(lo, hi, b - 1) for (lo, hi), b in zip(padding, base_dilation, strict=True)])
    out = [(n - (w - 1) * d - 1) // s + 1
           for n, w, d, s in zip(x.shape, dims, window_dilation, strides, strict=True)]
    acc = None
    for tap in itertools.product(*(range(w) for w in dims)):
        part = x[tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                       for t, d, o, s in zip(tap, window_dilation, out, strides, strict=True))]
        acc = part.copy() if acc is None else op(acc, part)
    return acc


def _window(eqn, x):
    p = eqn.params
    op, init = WINDOW[eqn.primitive.name]
    return window(x, op, init, p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"],
                  p["window_dilation"])


def _conv(eqn, lhs, rhs):
    """conv_general_dilated as one matrix product: input patches (rows, taps * C) times the kernel."""
    p = eqn.params
    if p["batch_group_count"] != 1:
        return None
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    x = np.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (N, spatial..., C)
    k = np.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (spatial..., I, O)
    config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], p["lhs_dilation"],
                                                                      strict=True)] + [(0, 0, 0)]
    x = pad(x, 0.0, config) if any(c != (0, 0, 0) for c in config) else x
    spatial, (groups, width_in, width_out) = k.shape[:-2], (p["feature_group_count"], *k.shape[-2:])
    strides, dilation = p["window_strides"], p["rhs_dilation"]
    out = [(n - (w - 1) * d - 1) // s + 1 for n, w, d, s in zip(x.shape[1:-1], spatial, dilation, strides,
                                                                  strict=True)]
    view = np.lib.stride_tricks.as_strided(  # (N, out..., taps..., C): every patch, no copy yet
        x, (x.shape[0], *out, *spatial, x.shape[-1]),
        (x.strides[0], *(st * s for st, s in zip(x.strides[1:-1], strides, strict=True)),
         *(st * d for st, d in zip(x.strides[1:-1], dilation, strict=True)), x.strides[-1]),
        writeable=False)
    rows, taps = x.shape[0] * math.prod(out), math.prod(spatial)
    patches = view.reshape(rows, taps * x.shape[-1])
    if groups == 1:
        acc = patches @ k.reshape(taps * width_in, width_out)
    else:
        acc = np.einsum("rtgi,tigo->rgo", patches.reshape(rows, taps, groups, width_in),
                        k.reshape(taps, width_in, groups, width_out // groups), optimize=True)
    acc = acc.reshape(x.shape[0], *out, width_out)
    n = len(out)
    return np.moveaxis(acc, [0, n + 1, *range(1, n + 1)], [out_spec[0], out_spec[1], *out_spec[2:]])


def _dot(eqn, lhs, rhs):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    left = [next(letters) for _ in range(lhs.ndim)]
    right = [next(letters) for _ in range(rhs.ndim)]
    for a, b in zip(lc, rc, strict=True):
        right[b] = left[a]
    for a, b in zip(lb, rb, strict=True):
        right[b] = left[a]
    batch = [left[a] for a in lb]
    free_l = [c for i, c in enumerate(left) if i not in lc and i not in lb]
    free_r = [c for i, c in enumerate(right) if i not in rc and i not in rb]
    spec = f"{''.join(left)},{''.join(right)}->{''.join(batch + free_l + free_r)}"
    return np.einsum(spec, lhs, rhs, optimize=True)


def _gather(eqn, x, indices):
    """The channel selection form only: `x[..., idx]` along one axis (anything else goes through JAX)."""
    d = eqn.params["dimension_numbers"]
    if (getattr(d, "operand_batching_dims", ()) or len(d.start_index_map) != 1
            or tuple(d.collapsed_slice_dims) != tuple(d.start_index_map) or indices.shape[-1] != 1):
        return None
    axis = d.start_index_map[0]
    sizes = eqn.params["slice_sizes"]
    if any(s != (1 if i == axis else x.shape[i]) for i, s in enumerate(sizes)):
        return None
    index = np.asarray(indices[..., 0], dtype=np.int64)
    if index.ndim != 1 or np.any(index < 0) or np.any(index >= x.shape[axis]):
        return None
    taken = np.take(x, index, axis=axis)
    others = [i for i in range(taken.ndim) if i not in d.offset_dims]
    return np.moveaxis(taken, axis, others[0]) if others else taken


RULES = {
    "convert_element_type": _convert, "integer_pow": _integer_pow, "round": _round, "select_n": _select_n,
    "clamp": _clamp, "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "squeeze": _squeeze,
    "expand_dims": _expand_dims, "transpose": _transpose, "concatenate": _concatenate, "slice": _slice,
    "pad": _pad, "iota": _iota, "rev": _rev, "argmax": _argmax, "argmin": _argmax,
    "conv_general_dilated": _conv, "dot_general": _dot, "gather": _gather,
    "optimization_barrier": lambda eqn, *xs: list(xs),
    **{name: _reduce for name in REDUCE}, **{name: _window for name in WINDOW},
}
