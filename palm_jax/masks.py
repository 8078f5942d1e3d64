"""Which leaves of a parameter tree the proximal transforms act on.

By default: every 1-D leaf whose last path key is ``scale`` (BatchNorm scales in Linen ``params`` and in
NNX state). A user ``mask`` may instead be

- a pytree of bools with the structure of the params, or a prefix of it (``{"bn1": True, "conv": False}``);
- a callable ``params -> pytree of bools`` (the ``optax.masked`` convention);
- a callable ``(path, leaf) -> bool`` (any callable with exactly two required positional arguments).

Paths are compared by key names, so a mask written as plain dicts also matches ``nnx.State``, and the
``.value`` attribute of an NNX ``Variable`` wrapper is ignored.
"""

import inspect
from typing import Any

import jax
import numpy as np

from palm_jax.utils import key_name, leaf_path  # noqa: F401  (re-exported: masks.leaf_path)

Mask = Any  # None, a pytree of bools, or a callable (see the module docstring)
LeafPath = tuple[str, ...]


def is_bn_scale(path, leaf) -> bool:
    """The default selection: a 1-D leaf whose last path key is named ``scale``."""
    names = leaf_path(path)
    return bool(names) and names[-1] == "scale" and np.ndim(leaf) == 1


def _takes_path_and_leaf(fn) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 2


def _as_bool(value, where: str) -> bool:
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"mask must be static (Python bools), got a traced value at {where}")
    if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.bool_):
        raise ValueError(f"mask must hold bools, got {value!r} at {where}")
    return bool(value)


def _from_bool_tree(mask_tree, paths: list[LeafPath]) -> list[bool]:
    """Match each leaf path to the mask entry at the same path or at its longest prefix."""
    entries = {leaf_path(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask_tree)[0]}
    selected = []
    for path in paths:
        prefix = next((path[:n] for n in range(len(path), -1, -1) if path[:n] in entries), None)
        if prefix is None:
            raise ValueError(f"mask has no entry for the parameter at {'/'.join(path)!r}")
        selected.append(_as_bool(entries[prefix], "/".join(prefix) or "<root>"))
    return selected


def selection(tree, mask: Mask = None) -> list[bool]:
    """One bool per leaf of ``tree`` (in ``jax.tree.leaves`` order): whether ``mask`` selects it.

    Raises:
      ValueError: naming ``mask`` if it selects no leaf, has no entry for a leaf, or holds non-bools.
    """
    with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    if mask is None:
        selected = [is_bn_scale(p, leaf) for p, leaf in with_paths]
    elif callable(mask) and _takes_path_and_leaf(mask):
        selected = [_as_bool(mask(p, leaf), "/".join(leaf_path(p))) for p, leaf in with_paths]
    else:
        mask_tree = mask(tree) if callable(mask) else mask
        selected = _from_bool_tree(mask_tree, [leaf_path(p) for p, _ in with_paths])
    if not any(selected):
        what = "no 1-D leaf named 'scale' (no BatchNorm scale)" if mask is None else "nothing"
        raise ValueError(f"mask selects {what} in the params; pass a mask selecting the leaves to sparsify")
    return selected


def select(tree, mask: Mask = None):
    """``tree`` with each leaf replaced by whether ``mask`` selects it (a pytree of Python bools)."""
    return jax.tree.structure(tree).unflatten(selection(tree, mask))
