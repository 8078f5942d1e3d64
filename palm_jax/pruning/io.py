"""Save and load a pruned model: an Orbax checkpoint of the variables plus a JSON description of the module.

    path/pruned_model.json   {"format": "palm_jax.pruned", "version": 1, "module": "pkg.mod:Class",
                              "fields": {...dataclass fields...}, "report": {...}}
    path/variables/          Orbax StandardCheckpointer checkpoint of {"params", "batch_stats"}

Loading imports the class from its path and rebuilds it from the fields, so a fresh process needs neither
the original model nor any pickle. Field values may be JSON values, tuples (stored as lists), dtypes and
importable functions (e.g. an activation); anything else is refused when saving.
"""

import dataclasses
import importlib
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from palm_jax.pruning.api import PruneResult

FORMAT, VERSION = "palm_jax.pruned", 1
META, VARIABLES = "pruned_model.json", "variables"
SKIPPED_FIELDS = ("parent", "name")


class PrunedCheckpointError(ValueError):
    """A directory that is not a readable `save_pruned` checkpoint (one-line message)."""


def _encode(value, field: str):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_encode(v, field) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, field) for k, v in value.items()}}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"__dtype__": np.dtype(value).name}
    name = f"{getattr(value, '__module__', '')}:{getattr(value, '__qualname__', '')}"
    if callable(value) and _resolve(name) is value:
        return {"__callable__": name}
    raise ValueError(f"save_pruned: field {field!r} = {value!r} cannot be stored as JSON")


def _decode(value):
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if "__dtype__" in value:
            return jnp.dtype(value["__dtype__"])
        if "__callable__" in value:
            return _resolve(value["__callable__"])
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    return value


def _resolve(name: str):
    """The object at "package.module:Qual.name", or None."""
    module, _, qualname = name.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj


def save_pruned(path, result: PruneResult) -> None:
    """Write `result` (from `prune` or `load_pruned`) to the directory `path` (created; must not exist)."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"save_pruned: {path} exists and is not empty; pick a new directory")
    model = result.model
    cls = type(model)
    class_path = f"{cls.__module__}:{cls.__qualname__}"
    if "<locals>" in cls.__qualname__ or _resolve(class_path) is not cls:
        raise ValueError(f"save_pruned: {cls.__qualname__} is not importable as {class_path}; define the "
                         "model class at module level in an importable module")
    if "input_shape" not in result.report:
        raise ValueError("save_pruned: result.report has no input_shape; save what prune or load_pruned gave")
    fields = {
        f.name: _encode(getattr(model, f.name), f.name)
        for f in dataclasses.fields(model)
        if f.init and f.name not in SKIPPED_FIELDS
    }
    meta = {"format": FORMAT, "version": VERSION, "module": class_path, "fields": fields,
            "report": result.report}
    text = json.dumps(meta, indent=1, default=_json_default)  # fails before anything is written
    path.mkdir(parents=True, exist_ok=True)
    variables = {k: result.variables[k] for k in ("params", "batch_stats")}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / VARIABLES, variables)
        checkpointer.wait_until_finished()
    (path / META).write_text(text)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _first_difference(stored: dict, expected: dict) -> str:
    for name in sorted(set(stored) | set(expected)):
        if stored.get(name) != expected.get(name):
            return f"{name}: saved {stored.get(name)}, expected {expected.get(name)}"
    return ""


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def load_pruned(path) -> PruneResult:
    """Read a directory written by `save_pruned`; raises PrunedCheckpointError if it is foreign or corrupt."""
    path = Path(path).absolute()

    def fail(why: str):
        return PrunedCheckpointError(f"load_pruned: {path} is not a palm_jax pruned model: {why}")

    if not path.is_dir():
        raise fail("not a directory")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise fail(f"no {META}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"unreadable {META} ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise fail(f"{META} has no format {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise fail(f"version {meta.get('version')!r}, this palm_jax reads version {VERSION}")
    cls = _resolve(str(meta.get("module")))
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise fail(f"cannot import the Flax module class {meta.get('module')!r}")
    try:
        model = cls(**{k: _decode(v) for k, v in meta["fields"].items()})
    except Exception as err:
        raise fail(f"{cls.__name__} rejects the saved fields ({_first_line(err)})") from None
    if not (path / VARIABLES).is_dir():
        raise fail(f"no {VARIABLES}/ checkpoint")
    input_shape = tuple(meta.get("report", {}).get("input_shape", ()))
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example)
        target = {k: target[k] for k in ("params", "batch_stats")}
    except Exception as err:
        raise fail(f"{cls.__name__} with the saved fields does not initialise ({_first_line(err)})") from None
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path / VARIABLES).item_metadata
            if stored is None:
                raise fail(f"{VARIABLES}/ holds no readable Orbax checkpoint")
            mismatch = _first_difference(_shapes(stored), _shapes(target))
            if mismatch:  # checked before restoring: a failed restore leaves Orbax's async reads behind
                raise fail(f"the saved variables do not fit {cls.__name__} of the saved fields ({mismatch})")
            variables = checkpointer.restore(path / VARIABLES, target)
    except PrunedCheckpointError:
        raise
    except Exception as err:
        raise fail(f"the variables checkpoint does not restore ({_first_line(err)})") from None
    variables = jax.tree.map(jnp.asarray, variables)
    return PruneResult(model, variables, meta.get("report", {}))
