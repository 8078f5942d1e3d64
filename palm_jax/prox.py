"""Optax transforms that drive BatchNorm scales to exact zeros, and helpers to read them out.

Reference: K. Bui, F. Xue, F. Park, Y. Qi, J. Xin, "A Proximal Algorithm for Network Slimming", LOD 2023
(arXiv:2307.00684); authors' code: https://github.com/kbui1993/Official-Proximal-Network-Slimming.

With ``S_t(x) = sign(x) * max(|x| - t, 0)`` and ``lr`` the learning rate of the current step:

- ``palm_prox``: gamma <- (a*gamma + beta*xi) / (a + beta), then
  xi <- S_{l1/(a+beta)}((a*xi + beta*gamma) / (a + beta)), with ``a = 1/lr``, ``gamma`` the scale after the
  optimizer's step, and ``xi`` its sparse copy;
- ``soft_threshold``: gamma <- S_{lr*l1}(gamma) (proximal SGD);
- ``l1_subgradient``: grad <- grad + l1 * sign(gamma) (Network Slimming, Liu et al. 2017).

Selection of leaves (BatchNorm scales by default) is described in ``palm_jax.masks``.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from palm_jax import masks


class PalmProxState(NamedTuple):
    """State of ``palm_prox``."""

    count: jax.Array  # updates applied so far: the step the learning-rate schedule is evaluated at
    xi: optax.Params  # the sparse copy of each selected leaf; optax.MaskedNode() for the other leaves


class SoftThresholdState(NamedTuple):
    """State of ``soft_threshold``."""

    count: jax.Array  # updates applied so far


def _check(name, value, *, allow_zero=False):
    """Reject a bad concrete number; arrays and tracers (e.g. under ``inject_hyperparams``) pass."""
    if isinstance(value, numbers.Real) and not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _schedule(learning_rate):
    """``learning_rate`` (a number or an optax schedule) as a function of the step count."""
    if not callable(learning_rate):
        _check("learning_rate", learning_rate)
        return lambda count: learning_rate
    first = learning_rate(0)
    if not isinstance(first, jax.core.Tracer) and not float(first) > 0:
        raise ValueError(f"learning_rate must be > 0, but the schedule gives {float(first)} at step 0")
    return learning_rate


def _require(params, name):
    if params is None:
        raise ValueError(f"{name} needs the params: call tx.update(grads, opt_state, params)")


def _is_placeholder(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _shrink(x, t):
    """S_t(x) = sign(x) * max(|x| - t, 0), written so that the zeros are +0.0."""
    return jnp.where(jnp.abs(x) > t, x - jnp.sign(x) * t, jnp.zeros_like(x))


def _wide(x):
    """Compute dtype of a leaf: at least float32 (bf16 leaves are computed in float32, stored as bf16)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _map_selected(fn, updates, params, selected):
    """``updates`` with ``fn(update, param)`` on the selected leaves; the others are returned as they are."""
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = jax.tree.leaves(params)
    if not len(u_leaves) == len(p_leaves) == len(selected):
        raise ValueError("updates and params do not have the same leaves")
    triples = zip(u_leaves, p_leaves, selected, strict=True)
    return treedef.unflatten([fn(u, p) if s else u for u, p, s in triples])


def _palm_step(u, p, xi, lr, l1, beta):
    """One leaf of ``palm_prox``: returns (outgoing update, new xi), in the update's and xi's dtypes."""
    dtype = _wide(p)
    w = jnp.asarray(lr * beta, dtype)  # beta / a
    g, x = p.astype(dtype) + u.astype(dtype), xi.astype(dtype)
    gamma = (g + w * x) / (1 + w)  # = (a*g + beta*xi) / (a + beta)
    new_xi = _shrink((x + w * gamma) / (1 + w), jnp.asarray(lr * l1, dtype) / (1 + w))  # t = l1 / (a + beta)
    return (gamma - p).astype(u.dtype), new_xi.astype(xi.dtype)


XI_UNIFORM_RANGE = (0.47, 0.53)  # the authors' xi init: proximal-ns models/vgg.py:45, preresnet.py:99-101,
# densenet.py:115 (`weight_copy.data.uniform_(0.47,0.53)`), around their BN scale init 0.5 (vgg.py:80)


def _initial_xi(params, selected, xi_init, xi_seed):
    """xi at `init`: a copy of each selected leaf (None), or U(0.47, 0.53) draws of its shape ("uniform")."""
    leaves, treedef = jax.tree.flatten(params)

    def start(i, p):
        if xi_init is None:
            return jnp.array(p, copy=True)
        key = jax.random.fold_in(jax.random.key(xi_seed), i)
        return jax.random.uniform(key, jnp.shape(p), _wide(p), *XI_UNIFORM_RANGE).astype(p.dtype)

    pairs = enumerate(zip(leaves, selected, strict=True))
    xi = [start(i, p) if s else optax.MaskedNode() for i, (p, s) in pairs]
    return treedef.unflatten(xi)


def palm_prox(l1, beta, learning_rate, mask=None, xi_init=None, xi_seed=0) -> optax.GradientTransformation:
    """Proximal Network Slimming (Bui et al. 2023): the last link of an optax chain.

    For each selected leaf, with ``g = param + incoming update`` and ``a = 1 / learning_rate(count)``::

        gamma = (a * g + beta * xi) / (a + beta)
        xi   <- S_{l1 / (a + beta)}((a * xi + beta * gamma) / (a + beta))

    and the outgoing update is ``gamma - param``. The code divides both fractions through by ``a``
    (``w = lr * beta``), which is the same update and stays finite if a schedule reaches ``lr = 0``.
    Unselected leaves pass through untouched. ``xi`` starts at the selected leaves' values at ``init``
    (``xi_init=None``) or, with ``xi_init="uniform"``, as the authors' code starts it: each entry drawn from
    U(0.47, 0.53) (``XI_UNIFORM_RANGE``), from ``jax.random.key(xi_seed)`` folded with the leaf's index.
    Read it with ``sparse_scales``.

    Args:
      l1: weight of the l1 penalty on the scales, >= 0.
      beta: weight of the coupling ``beta/2 * ||gamma - xi||^2``, > 0.
      learning_rate: a float or an optax schedule, the same one the optimizer uses.
      mask: which leaves to act on (default: BatchNorm scales); see ``palm_jax.masks``.
      xi_init: None (xi starts as a copy of the selected leaves) or "uniform" (U(0.47, 0.53), the authors').
      xi_seed: the seed of the "uniform" draws.
    """
    _check("l1", l1, allow_zero=True)
    _check("beta", beta)
    lr_at = _schedule(learning_rate)
    if xi_init not in (None, "uniform"):
        raise ValueError(f"xi_init must be None (the params' values) or 'uniform', got {xi_init!r}")

    def init(params):
        xi = _initial_xi(params, masks.selection(params, mask), xi_init, xi_seed)
        return PalmProxState(count=jnp.zeros([], jnp.int32), xi=xi)

    def update(updates, state, params=None):
        _require(params, "palm_prox")
        lr = lr_at(state.count)
        u_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        try:
            xi_leaves = treedef.flatten_up_to(state.xi)  # an array or a placeholder per leaf of updates
        except (ValueError, TypeError) as e:
            raise ValueError("the palm_prox state was built for other params than these updates") from e
        if len(p_leaves) != len(u_leaves):
            raise ValueError("updates and params do not have the same leaves")
        pairs = [(u, xi) if _is_placeholder(xi) else _palm_step(u, p, xi, lr, l1, beta)
                 for u, p, xi in zip(u_leaves, p_leaves, xi_leaves, strict=True)]
        new_updates, new_xi = zip(*pairs, strict=True)
        new_state = PalmProxState(count=optax.safe_increment(state.count), xi=treedef.unflatten(new_xi))
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init, update)


def soft_threshold(l1, learning_rate, mask=None) -> optax.GradientTransformation:
    """Proximal SGD: each selected leaf becomes ``S_{lr * l1}(param + incoming update)``.

    The last link of an optax chain; ``lr = learning_rate(count)``, ``count`` the updates applied so far.
    Unselected leaves pass through untouched.
    """
    _check("l1", l1, allow_zero=True)
    lr_at = _schedule(learning_rate)

    def init(params):
        masks.selection(params, mask)  # an empty mask fails here, at init
        return SoftThresholdState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        _require(params, "soft_threshold")
        lr = lr_at(state.count)

        def step(u, p):
            dtype = _wide(p)
            new = _shrink(p.astype(dtype) + u.astype(dtype), jnp.asarray(lr * l1, dtype))
            return (new - p).astype(u.dtype)

        updates = _map_selected(step, updates, params, masks.selection(params, mask))
        return updates, SoftThresholdState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def l1_subgradient(l1, mask=None) -> optax.GradientTransformation:
    """Network Slimming's sparsity term: adds ``l1 * sign(param)`` to the gradient of each selected leaf.

    Place it first in the chain, before the optimizer. Unselected leaves pass through untouched.
    """
    _check("l1", l1, allow_zero=True)

    def init(params):
        masks.selection(params, mask)
        return optax.EmptyState()

    def update(updates, state, params=None):
        _require(params, "l1_subgradient")

        def step(u, p):
            dtype = _wide(u)
            return (u.astype(dtype) + jnp.asarray(l1, dtype) * jnp.sign(p).astype(dtype)).astype(u.dtype)

        return _map_selected(step, updates, params, masks.selection(params, mask)), state

    return optax.GradientTransformation(init, update)


def l1_penalty(params, mask=None) -> jax.Array:
    """``sum |gamma|`` over the selected leaves (BatchNorm scales by default), for logging the objective."""
    selected = masks.selection(params, mask)
    leaves = [p for p, s in zip(jax.tree.leaves(params), selected, strict=True) if s]
    return sum(jnp.sum(jnp.abs(p.astype(_wide(p)))) for p in leaves)


def sparse_scales(params, opt_state):
    """``params`` with every leaf that a ``palm_prox`` in ``opt_state`` tracks replaced by its ``xi``.

    The ``PalmProxState`` is found anywhere in ``opt_state`` (a chain, ``inject_hyperparams``, ``MultiSteps``,
    ``masked``, an ``nnx.Optimizer``'s ``opt_state``). Leaves are matched by path, so NNX ``Variable``
    wrappers on either side are fine.
    """
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PalmProxState))
    states = [s for s in found if isinstance(s, PalmProxState)]
    if not states:
        raise ValueError("opt_state holds no PalmProxState: build the optimizer with palm_jax.palm_prox")
    xi = {}
    for state in states:
        xi.update((masks.leaf_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state.xi)[0])
    replaced = []

    def swap(path, param):
        new = xi.get(masks.leaf_path(path))
        if new is None:
            return param
        if jnp.shape(new) != jnp.shape(param):
            raise ValueError(f"xi at {'/'.join(masks.leaf_path(path))} has shape {jnp.shape(new)}, "
                             f"the param {jnp.shape(param)}: opt_state belongs to other params")
        replaced.append(path)
        return new

    out = jax.tree_util.tree_map_with_path(swap, params)
    if not replaced:
        raise ValueError("no leaf of params is tracked by a PalmProxState: opt_state belongs to other params")
    return out
