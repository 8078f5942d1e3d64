"""The walk's rules for ops that move, reshape, pad, pool or gather values (mixed into `trace.Walker`).

Each keeps the channel nodes, constants, patterns and offsets of its operand in step with what it does to
the value; a rule returning None means the op is not understood there and the walker pins it.
"""

import math

import numpy as np

from palm_jax.pruning.values import Val, nonzero, same_pattern, uniform, window_pattern

RESHAPES = ("broadcast_in_dim", "reshape", "squeeze", "expand_dims")
# Ops through which a value is still its leaf (reshaped, broadcast or cast), and how offsets pass them.
CASTS = frozenset(["convert_element_type", "copy", "copy_p", "reduce_precision"])
REDUCE_SCALE = {"reduce_sum": "count", "reduce_max": "same", "reduce_min": "same"}
WINDOW_SCALE = {"reduce_window_sum": "count", "reduce_window_max": "same", "reduce_window_min": "same"}
SHAPE_RULES = {
    "concatenate": "_concatenate", "slice": "_slice", "pad": "_pad", "transpose": "_transpose",
    "gather": "_gather", **{name: "_reshape" for name in RESHAPES},
    **{name: "_reduce" for name in REDUCE_SCALE}, **{name: "_window" for name in WINDOW_SCALE},
}


def last(aval) -> int | None:
    return aval.shape[-1] if aval.shape else None


def flat(const: np.ndarray, pattern) -> np.ndarray:
    """The constants of a value whose pattern is lost (`pattern` not None): only the zeros stay constant."""
    return const if pattern is None else np.where(const == 0, 0.0, np.nan)


class ShapeRules:
    """Rules for structural ops; needs the walker's `graph`, `out`, `carriers` and `_lose`."""

    def _spread(self, a: Val, pattern, eqn, what: str):
        """A uniform offset that becomes `pattern` (None: stays uniform): scaled, else a carrier at its
        kernels (exact mode) or the mean (approximate)."""
        scale, left = uniform(pattern)
        if not nonzero(a.off):
            return None
        if left is None:
            return a.off * scale
        if self.carriers is not None:
            self.out.force.update(a.src)
            return None
        self.out.approximate.append(what)
        return a.off * float(np.mean(left))

    def _reshape(self, eqn, args):
        """reshape, broadcast_in_dim, squeeze, expand_dims: keep, broadcast or tile (flatten) the channels."""
        a = args[0]
        src_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if not out_shape:
            return [Val(None, np.asarray(a.const).reshape(-1)[0])]
        width = out_shape[-1]
        same_rank = len(src_shape) == len(out_shape)
        pattern = a.pattern if same_rank else None
        const = a.const if same_rank else flat(a.const, a.pattern)
        if eqn.primitive.name == "broadcast_in_dim" and src_shape:
            if eqn.params["broadcast_dimensions"][-1] != len(out_shape) - 1:
                return None  # the channel axis moves: pin
            if src_shape[-1] != width:  # a size-1 last axis broadcast to `width` positions
                off = np.broadcast_to(a.off, (width,)).copy() if nonzero(a.off) else None
                return [Val(self.graph.fresh(width), np.repeat(const, width), None, off, a.src, pattern)]
        if not src_shape:
            off = np.full(width, float(a.off)) if nonzero(a.off) else None
            return [Val(self.graph.fresh(width), np.full(width, float(a.const)), None, off, a.src)]
        if src_shape[-1] == width:
            leaf = a.leaf if math.prod(src_shape[:-1]) == 1 else None  # a vector, reshaped or broadcast
            return [Val(a.nodes, const, leaf, a.off, a.src, pattern, a.view)]
        for k in range(len(src_shape) - 2, -1, -1):  # a flatten merging trailing axes into the last one
            merged = math.prod(src_shape[k:])
            if merged == width:
                rep = width // src_shape[-1]
                off = np.tile(a.off, rep) if nonzero(a.off) else None
                return [Val(np.tile(a.nodes, rep), self._flatten(a, src_shape, k, rep), None, off, a.src)]
            if merged > width:
                break
        return None

    @staticmethod
    def _flatten(a: Val, src_shape, k: int, rep: int) -> np.ndarray:
        """Per flattened position, the constant: the channel's constant times the pattern there."""
        if a.pattern is None:
            return np.tile(a.const, rep)
        pattern = np.broadcast_to(a.pattern, (*src_shape[:-1], 1)).reshape(-1, rep)
        if not np.all(pattern == pattern[:1]):  # varies over the kept leading axes
            return np.tile(flat(a.const, a.pattern), rep)
        return (pattern[0][:, None] * a.const[None, :]).reshape(-1)

    def _concatenate(self, eqn, args):
        aval = eqn.outvars[0].aval
        if eqn.params["dimension"] == len(aval.shape) - 1:
            pattern = next((a.pattern for a in args if a.pattern is not None), None)
            consts = [a.const if same_pattern(a.pattern, pattern) else flat(a.const, 0) for a in args]
            nodes = np.concatenate([a.nodes for a in args])
            offs = [a.off if nonzero(a.off) else np.zeros(len(a.nodes)) for a in args]
            off = np.concatenate(offs) if any(nonzero(a.off) for a in args) else None
            return [Val(nodes, np.concatenate(consts), None, off, frozenset().union(*(a.src for a in args)),
                        pattern)]
        for a in args[1:]:
            self.graph.union(args[0].nodes, a.nodes)
        same = all(np.array_equal(a.const, args[0].const) and a.pattern is None for a in args)
        const = args[0].const if same else np.full(aval.shape[-1:], np.nan)
        if any(nonzero(a.off) for a in args):
            for a in args:
                self._lose(a, "concatenate")
        return [Val(args[0].nodes, const)]

    def _slice(self, eqn, args):
        a, p = args[0], eqn.params
        strides = p["strides"] or (1,) * len(p["start_indices"])
        cut = slice(p["start_indices"][-1], p["limit_indices"][-1], strides[-1])
        off = a.off[cut] if nonzero(a.off) else None
        pattern = a.pattern
        if pattern is not None:
            pattern = pattern[tuple(slice(lo, hi, s) if n > 1 else slice(None) for lo, hi, s, n in zip(
                p["start_indices"][:-1], p["limit_indices"][:-1], strides[:-1], pattern.shape[:-1],
                strict=True)) + (slice(None),)]
        return [Val(a.nodes[cut], a.const[cut], None, off, a.src, pattern)]

    def _pad(self, eqn, args):
        a, value = args
        config = eqn.params["padding_config"]
        if tuple(config[-1]) != (0, 0, 0):
            return None
        if all(tuple(c) == (0, 0, 0) for c in config):
            return [Val(a.nodes, a.const, None, a.off, a.src, a.pattern)]
        from palm_jax.pruning.evaluate import pad

        shape = eqn.invars[0].aval.shape
        base = np.broadcast_to(a.pattern if a.pattern is not None else 1.0, (*shape[:-1], 1))
        pattern = pad(np.asarray(base, dtype=np.float64), 0.0, config)
        const = a.const if np.asarray(value.const).reshape(-1)[0] == 0 else flat(a.const, pattern)
        scale, pattern = uniform(pattern)
        off = self._spread(a, pad(np.ones((*shape[:-1], 1)), 0.0, config), eqn, "pad")
        return [Val(a.nodes, const * scale, None, off, a.src, pattern)]

    def _transpose(self, eqn, args):
        perm = eqn.params["permutation"]
        if perm[-1] != len(perm) - 1:
            return None
        a = args[0]
        pattern = None if a.pattern is None else np.transpose(a.pattern, perm)
        return [Val(a.nodes, a.const, None, a.off, a.src, pattern)]

    def _reduce(self, eqn, args):
        a, axes, shape = args[0], eqn.params["axes"], eqn.invars[0].aval.shape
        if len(shape) - 1 in axes:
            return None
        count = math.prod(shape[i] for i in axes) if REDUCE_SCALE[eqn.primitive.name] == "count" else 1
        off = a.off * count if nonzero(a.off) else None
        const, pattern = a.const * count, None
        if a.pattern is not None:
            if REDUCE_SCALE[eqn.primitive.name] == "count":
                summed = np.broadcast_to(a.pattern, (*shape[:-1], 1)).sum(axis=tuple(axes))
                scale, pattern = uniform(summed)
                const = a.const * scale
            else:
                const = flat(a.const, a.pattern)
        return [Val(a.nodes, const, None, off, a.src, pattern)]

    def _window(self, eqn, args):
        a, p = args[0], eqn.params
        dims = p["window_dimensions"]
        if dims[-1] != 1 or p["window_strides"][-1] != 1 or tuple(p["padding"][-1]) != (0, 0):
            return None
        if p["base_dilation"][-1] != 1 or p["window_dilation"][-1] != 1:
            return None
        if WINDOW_SCALE[eqn.primitive.name] == "count":  # sum pool: the constants take the window's pattern
            scale, pattern = uniform(window_pattern(eqn, a.pattern))
            off = self._spread(a, window_pattern(eqn, None), eqn, eqn.primitive.name)
            return [Val(a.nodes, a.const * scale, None, off, a.src, pattern)]
        # max / min pool: a constant stays itself (padding is -inf / +inf), so does a uniform shift
        return [Val(a.nodes, flat(a.const, a.pattern), None, a.off, a.src)]

    def _gather(self, eqn, args):
        """`x[..., indices]` with constant indices on the channel axis (a BN's channel selection): a view of
        the stream's nodes. The gathered value gets nodes of its own; the pruner pins the stream unless
        only gathering BNs read that value."""
        a, index = args
        d, shape = eqn.params["dimension_numbers"], eqn.invars[0].aval.shape
        axis = len(shape) - 1
        if (index.array is None or getattr(d, "operand_batching_dims", ())
                or tuple(d.start_index_map) != (axis,) or tuple(d.collapsed_slice_dims) != (axis,)
                or tuple(d.offset_dims) != tuple(range(axis))
                or tuple(eqn.params["slice_sizes"]) != (*shape[:-1], 1) or index.array.ndim != 2):
            return None
        positions = np.asarray(index.array[:, 0], dtype=np.int64)
        if np.any(positions < 0) or np.any(positions >= shape[-1]):
            return None
        nodes = self.graph.fresh(len(positions))
        self.out.gathers.append((nodes, a.nodes))
        view = (a.nodes, positions) if a.view is None else (a.view[0], a.view[1][positions])
        off = a.off[positions] if nonzero(a.off) else None
        return [Val(nodes, a.const[positions], None, off, a.src, a.pattern, view)]

