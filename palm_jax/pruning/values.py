"""What a walk knows about one value, per position of its last axis, and the arithmetic on it.

A channel is constant when it does not depend on the network input. Its value is `const[c] * pattern`: a
number per channel times one spatial pattern shared by every constant channel of the value (None: 1
everywhere). A zero-padded average pool turns a constant c into c times the pool's coverage map; every
constant channel of that value, a carrier included, gets the same map, which is what keeps carriers exact
there.
"""

from dataclasses import dataclass

import numpy as np

from palm_jax.pruning.evaluate import NUMPY, is_float, window

PATTERN_KEEPING = frozenset(["neg", "convert_element_type", "copy", "copy_p", "reduce_precision"])


@dataclass
class Val:
    """One jaxpr value: channel nodes, constant values (NaN: not constant), the leaf it is a view of, the
    offset the pruned network lacks (uniform over the other axes) and the kernels it came from, the
    constants' spatial pattern, the channel gather it is (stream nodes, indices) and, for a small
    compile-time constant, the whole array."""

    nodes: np.ndarray | None
    const: np.ndarray
    leaf: int | None = None
    off: np.ndarray | None = None
    src: frozenset = frozenset()
    pattern: np.ndarray | None = None
    view: tuple | None = None
    array: np.ndarray | None = None


def const_of(value: np.ndarray) -> np.ndarray:
    """Per last-axis position, the value if it is the same over all other axes, else NaN."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        return value
    flat = value.reshape(-1, value.shape[-1])
    same = np.all(flat == flat[:1], axis=0)
    return np.where(same, flat[0], np.nan)


def coverage(size, taps, stride, low, dilation, base_dilation, out) -> np.ndarray:
    """Per tap of a window along one axis, the fraction of output positions where it reads the input (not
    padding). A constant input c gives the outputs sum_t w_t c at interior positions; the per-channel constant
    closest to all of them is sum_t coverage_t w_t c, which is what folding uses (exact without padding)."""
    at = np.arange(out)[:, None] * stride - low + np.arange(taps)[None, :] * dilation
    inside = (at >= 0) & (at <= (size - 1) * base_dilation) & (at % base_dilation == 0)
    return inside.mean(axis=0)


def window_coverage(eqn, in_axes, window_axes, out_axes, p, window_shape) -> np.ndarray:
    """Coverage of every window tap (broadcastable to `window_shape`) for a conv or reduce_window."""
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    weight = np.ones([1] * len(window_shape))
    for d, (low, _) in enumerate(p["padding"]):
        cover = coverage(in_shape[in_axes[d]], window_shape[window_axes[d]], p["window_strides"][d], low,
                         p["rhs_dilation" if "rhs_dilation" in p else "window_dilation"][d],
                         p["lhs_dilation" if "lhs_dilation" in p else "base_dilation"][d],
                         out_shape[out_axes[d]])
        shape = [1] * len(window_shape)
        shape[window_axes[d]] = len(cover)
        weight = weight * cover.reshape(shape)
    return weight


def nonzero(off) -> bool:
    return off is not None and bool(np.any(off != 0))


def uniform(pattern: np.ndarray | None):
    """(scale, None) when `pattern` is the same everywhere (or None), else (1, pattern)."""
    if pattern is None:
        return 1.0, None
    flat = pattern.reshape(-1)
    return (float(flat[0]), None) if np.all(flat == flat[0]) else (1.0, pattern)


def window_pattern(eqn, pattern: np.ndarray | None) -> np.ndarray:
    """The pattern a reduce_window_sum makes of a constant with `pattern` (zero padding included)."""
    p, shape = eqn.params, eqn.invars[0].aval.shape
    moves = [w != 1 or s != 1 or lo or hi or b != 1 for w, s, (lo, hi), b in zip(
        p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"], strict=True)]
    base_shape = [n if m else 1 for n, m in zip(shape, moves, strict=True)]
    if pattern is not None:
        base_shape = np.broadcast_shapes(tuple(base_shape), pattern.shape)
    base = np.broadcast_to(pattern if pattern is not None else 1.0, base_shape).astype(np.float64)
    return window(base, np.add, 0.0, p["window_dimensions"], p["window_strides"], p["padding"],
                  p["base_dilation"], p["window_dilation"])


def same_pattern(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(np.array_equal(*np.broadcast_arrays(a, b)))
    except ValueError:
        return False


def _exact(dtype):
    """Constants are folded in float64 whatever the compute dtype (bfloat16 rounding is the model's, not
    the pruning's; the exactness check evaluates in float64 too)."""
    return np.float64 if is_float(dtype) else dtype


def elementwise_const(eqn, args: list[Val], aval):
    """(constant values, pattern) of an elementwise op's output: the op applied to its operands' constants
    where all are constant, and 0 where a product has a constant-0 factor (how a zero BN scale silences x).
    Channels whose value is no constant times one shared pattern are NaN."""
    shape, name = aval.shape[-1:], eqn.primitive.name
    if name != "mul" and any(np.isnan(a.const).all() for a in args):  # the common case, fast
        return np.full(shape, np.nan), None
    vecs = [np.broadcast_to(a.const, shape) for a in args]
    known = [~np.isnan(v) for v in vecs]
    mask = np.logical_and.reduce(known)
    zero = np.logical_or.reduce([k & (v == 0) for v, k in zip(vecs, known, strict=True)])
    if name == "mul":
        mask = mask | zero
    if not np.any(mask):
        return np.full(shape, np.nan), None
    inputs = [np.asarray(np.where(k, v, 1), dtype=_exact(var.aval.dtype))
              for v, k, var in zip(vecs, known, eqn.invars, strict=True)]
    with np.errstate(all="ignore"):
        if name in NUMPY:
            result = NUMPY[name](*inputs)
        elif name == "integer_pow":
            result = inputs[0] ** eqn.params["y"]
        elif name == "convert_element_type":
            result = inputs[0].astype(_exact(eqn.params["new_dtype"]))
        else:  # rarer ops: jax itself (one small compile per new shape)
            result = eqn.primitive.bind(*inputs, **eqn.params)
    result = np.asarray(result, dtype=np.float64)
    if name == "mul":
        result = np.where(zero, 0.0, result)
    result = np.where(mask, result, np.nan)
    patterned = [a.pattern is not None for a in args]
    if not any(patterned):
        return result, None
    return _with_pattern(name, args, vecs, result, zero)


def _with_pattern(name, args, vecs, result, zero):
    """Keep the channels that stay a constant times the (one) pattern of the patterned operands."""
    pattern = next(a.pattern for a in args if a.pattern is not None)
    if not all(same_pattern(a.pattern, pattern) for a in args if a.pattern is not None):
        return np.where(zero & (name == "mul"), 0.0, np.nan), None
    flat = [a.pattern is None for a in args]
    silent = [np.nan_to_num(v) == 0 for v in vecs]  # a flat operand that is 0 there adds nothing
    if name in ("add", "sub", "add_any"):
        ok = np.logical_and.reduce([s | ~f for s, f in zip(silent, flat, strict=True)])
    elif name == "mul" and sum(not f for f in flat) == 1:
        ok = np.ones_like(result, dtype=bool)
    elif name == "div" and not flat[0]:
        if flat[1]:
            ok = np.ones_like(result, dtype=bool)
        else:  # c_a P / (c_b P): the pattern cancels
            return result, None
    elif name in ("max", "min") and np.all(pattern >= 0):  # relu of c P is relu(c) P for P >= 0
        ok = np.logical_and.reduce([s | ~f for s, f in zip(silent, flat, strict=True)])
    elif name in PATTERN_KEEPING:
        ok = np.ones_like(result, dtype=bool)
    else:
        ok = np.zeros_like(result, dtype=bool)
    keep = ok | (result == 0)
    return np.where(keep, result, np.nan), pattern


def carrier_delta(kernel: np.ndarray, in_axis: int, deficit: np.ndarray, carrier: int, const: float):
    """The change to `kernel` that makes its input channel `carrier` (a constant `const` everywhere) also
    bring what the inputs' constants `deficit` brought: exact next to zero padding too, where the carrier is
    padded exactly as they were."""
    moved = np.moveaxis(kernel.astype(np.float64), in_axis, -1)
    delta = np.zeros_like(moved)
    delta[..., carrier] = (moved @ deficit) / const
    return np.moveaxis(delta, -1, in_axis)
