"""Small helpers the package shares, each written once: an exception's first line, an atomic file write, a
tagged JSON description read back, a pytree key path as strings, a model's variables without computing them,
a parameter count, a function run with the garbage collector's existing objects frozen.

Importing this module imports no JAX (`abstract_variables` does, when called).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (for one-line errors)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_write(path, content: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write `content` (text, bytes, or a function writing into a binary file) to `path` so that a reader
    sees the old file or the whole new one: a temporary file in the same folder, then `os.replace`. Returns
    `path`."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_tagged_json(folder: Path, name: str, tag: str, version: int, fail, missing: str = "") -> dict:
    """The JSON object in `folder / name` whose "format" is `tag` and "version" is `version`. Anything else
    raises `fail(why)` (an exception with a one-line message): `folder` not a directory, the file absent
    (`missing` is appended to say how to make one), unreadable, of another format or version."""
    if not folder.is_dir():
        raise fail("not a directory")
    try:
        meta = json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise fail(f"no {name}{missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"unreadable {name} ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != tag:
        raise fail(f"{name} has no format {tag!r}")
    if meta.get("version") != version:
        raise fail(f"version {meta.get('version')!r}, this palm_jax reads version {version}")
    return meta


def key_name(key) -> str:
    """The name of one pytree path key: a dict key, attribute name or sequence index, as a string."""
    for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_path(path) -> tuple[str, ...]:
    """Key names of a leaf's path (from `jax.tree_util.tree_flatten_with_path`), without the trailing
    `.value` of an NNX `Variable` wrapper."""
    names = tuple(key_name(k) for k in path)
    if path and getattr(path[-1], "name", None) == "value":
        names = names[:-1]
    return names


def abstract_variables(model, input_shape) -> dict:
    """`model.init`'s variables as `jax.ShapeDtypeStruct`s for one input of shape `input_shape` (H, W, C),
    computed without allocating or running anything (`jax.eval_shape`)."""
    import jax
    import jax.numpy as jnp

    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example)


def count_params(tree) -> int:
    """Number of scalars in the array leaves of `tree` (e.g. a model's `params`)."""
    import jax
    import numpy as np

    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def frozen_gc(fn: Callable) -> Callable:
    """`fn` run with the objects that exist before it frozen (`gc.freeze()`), so that the collections
    during the call scan only what it allocates (a large trace makes many; with a big process, full
    collections otherwise rescan everything each time); unfrozen after. Where something else has frozen
    objects already, its freeze is left alone and `fn` runs as is."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run
