"""What the walk knows about one value, per position of its last axis, and the arithmetic on it."""

from dataclasses import dataclass

import numpy as np

# The common elementwise ops, in numpy.
NUMPY = {
    "add": np.add,
    "add_any": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda a: 1 / np.sqrt(a),
    "tanh": np.tanh,
    "logistic": lambda a: 1 / (1 + np.exp(-a)),
    "abs": np.abs,
    "sign": np.sign,
    "square": np.square,
    "copy": np.copy,
}


@dataclass
class Val:
    """One jaxpr value: channel nodes, constant values (NaN: not constant), the leaf it is a view of, the
    offset the pruned network lacks and the layers that offset came from."""

    nodes: np.ndarray | None
    const: np.ndarray
    leaf: int | None = None
    off: np.ndarray | None = None
    src: frozenset = frozenset()


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


def elementwise_const(eqn, args: list[Val], aval) -> np.ndarray:
    """The constant values of an elementwise op's output: the op applied to its operands' constants where
    all are constant, and 0 where a product has a constant-0 factor (how a zero BN scale silences x)."""
    shape = aval.shape[-1:]
    vecs = [np.broadcast_to(a.const, shape) for a in args]
    known = [~np.isnan(v) for v in vecs]
    mask = np.logical_and.reduce(known)
    zero = np.logical_or.reduce([k & (v == 0) for v, k in zip(vecs, known, strict=True)])
    name = eqn.primitive.name
    if name == "mul":
        mask = mask | zero
    if not np.any(mask):
        return np.full(shape, np.nan)
    inputs = [np.asarray(np.where(k, v, 1), dtype=var.aval.dtype)
              for v, k, var in zip(vecs, known, eqn.invars, strict=True)]
    with np.errstate(all="ignore"):
        if name in NUMPY:
            result = NUMPY[name](*inputs)
        elif name == "integer_pow":
            result = inputs[0] ** eqn.params["y"]
        elif name == "convert_element_type":
            result = inputs[0].astype(eqn.params["new_dtype"])
        else:  # rarer ops: jax itself (one small compile per new shape)
            result = eqn.primitive.bind(*inputs, **eqn.params)
    result = np.asarray(result, dtype=np.float64)
    if name == "mul":
        result = np.where(zero, 0.0, result)
    return np.where(mask, result, np.nan)


def carrier_delta(kernel: np.ndarray, in_axis: int, deficit: np.ndarray, carrier: int, const: float):
    """The change to `kernel` that makes its input channel `carrier` (a constant `const` everywhere) also
    bring what the inputs' constants `deficit` brought: exact next to zero padding too, where the carrier is
    padded exactly as they were."""
    moved = np.moveaxis(kernel.astype(np.float64), in_axis, -1)
    delta = np.zeros_like(moved)
    delta[..., carrier] = (moved @ deficit) / const
    return np.moveaxis(delta, -1, in_axis)
