"""Save and load a pruned model: an Orbax checkpoint of the variables plus a JSON description of the module.

A Linen model is rebuilt from its class and dataclass fields:

    path/pruned_model.json   {"format": "palm_jax.pruned", "version": 1, "module": "pkg.mod:Class",
                              "fields": {...dataclass fields...}, "report": {...}}
    path/variables/          Orbax StandardCheckpointer checkpoint of {"params", "batch_stats"}

An NNX module has no fields to rebuild it from: its unpruned constructor is saved with what pruning changed:

    path/pruned_model.json   {"format": "palm_jax.pruned", "version": 1, "kind": "nnx",
                              "module": "pkg.mod:Net" (the constructor: a class or function),
                              "arguments": {"args": [...], "kwargs": {...}}, "shapes": {state path: shape},
                              "gathers": {BatchNorm path: indices}, "modes": {module path: {flag: value}},
                              "report": {...}}
    path/variables/          Orbax StandardCheckpointer checkpoint of nnx.state(model) (every Variable)

Loading it builds `constructor(*args, **kwargs, rngs=nnx.Rngs(0))` under `nnx.eval_shape` (nothing is
computed), gives every Variable its saved shape, sets the layers' feature counts as `prune` does, makes the
saved BatchNorms gather, sets the eval / train flags, and restores the state into it. Saving builds it the
same way first and refuses a constructor that does not give the pruned module's structure.

Loading imports the class or constructor from its path, so a fresh process needs neither the original model
nor any pickle. Field and argument values may be JSON values, tuples (stored as lists), dtypes and importable
functions (e.g. an activation); anything else is refused when saving.
"""

import dataclasses
import functools
import importlib
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from palm_jax.pruning import nnx_layers
from palm_jax.pruning.api import PruneResult, error_line
from palm_jax.utils import abstract_variables, leaf_path, read_tagged_json

FORMAT, VERSION = "palm_jax.pruned", 1
META, VARIABLES = "pruned_model.json", "variables"
SKIPPED_FIELDS = ("parent", "name")
COLLECTIONS = ("params", "batch_stats")


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


def _importable(obj, what: str) -> str:
    """The "package.module:Qual.name" path of `obj`; ValueError where it does not import back to `obj`."""
    path = f"{obj.__module__}:{obj.__qualname__}"
    if "<locals>" in obj.__qualname__ or _resolve(path) is not obj:
        raise ValueError(f"save_pruned: {obj.__qualname__} is not importable as {path}; define the {what} at "
                         "module level in an importable module")
    return path


def save_pruned(path, result: PruneResult, *, constructor=None) -> None:
    """Write `result` (from `prune` or `load_pruned`) to the directory `path` (created; must not exist).

    For an NNX module, `constructor` builds the unpruned module when called with `rngs=`: its class (the
    default, called with no other argument), or an importable function, or a `functools.partial` of either
    with the arguments the model was built with (JSON values, tuples, dtypes, importable functions). The
    module's current state is saved."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"save_pruned: {path} exists and is not empty; pick a new directory")
    if "input_shape" not in result.report:
        raise ValueError("save_pruned: result.report has no input_shape; save what prune or load_pruned gave")
    if isinstance(result.model, nnx.Module):
        meta = _nnx_description(result.model, constructor)
        variables = nnx.to_pure_dict(nnx.state(result.model))
    else:
        model = result.model
        fields = {f.name: _encode(getattr(model, f.name), f.name) for f in dataclasses.fields(model)
                  if f.init and f.name not in SKIPPED_FIELDS}
        meta = {"module": _importable(type(model), "model class"), "fields": fields}
        variables = {k: result.variables[k] for k in COLLECTIONS}
    meta = {"format": FORMAT, "version": VERSION, **meta, "report": result.report}
    text = json.dumps(meta, indent=1, default=_json_default)  # fails before anything is written
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / VARIABLES, variables)
        checkpointer.wait_until_finished()
    (path / META).write_text(text)


def _nnx_description(model, constructor) -> dict:
    constructor = type(model) if constructor is None else constructor
    partial = isinstance(constructor, functools.partial)
    function = constructor.func if partial else constructor
    arguments = {"args": list(constructor.args if partial else ()),
                 "kwargs": dict(constructor.keywords if partial else {})}
    meta = {
        "kind": "nnx", "module": _importable(function, "constructor"),
        "arguments": _encode(arguments, "constructor arguments"),
        "shapes": {name: list(shape) for name, shape in _state_shapes(nnx.state(model)).items()},
        "gathers": {k: None if v is None else list(v) for k, v in nnx_layers.gathers(model).items()},
        "modes": nnx_layers.modes(model),
    }
    built = _build_nnx(meta, ValueError)
    if nnx.graphdef(built) != nnx.graphdef(model):
        name = function.__qualname__
        raise ValueError(f"save_pruned: {name}(rngs=...), resized to the pruned shapes, is not built like "
                         f"the pruned {type(model).__name__}; pass constructor=functools.partial({name}, "
                         "...) with the arguments the unpruned model was built with")
    return meta


def _state_shapes(state) -> dict:
    return {nnx_layers.path_name(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _build_nnx(meta: dict, fail):
    """The abstract pruned module of an NNX description (ShapeDtypeStruct values); `fail(why)` otherwise."""
    constructor = _resolve(str(meta.get("module")))
    if not callable(constructor):
        raise fail(f"cannot import the NNX constructor {meta.get('module')!r}")
    name = getattr(constructor, "__qualname__", "constructor")
    try:
        arguments = _decode(meta["arguments"])
        args, kwargs = arguments["args"], arguments["kwargs"]
        shapes, gathers, modes = dict(meta["shapes"]), dict(meta["gathers"]), dict(meta["modes"])
    except (KeyError, TypeError, ValueError) as err:
        raise fail(f"the NNX description lacks a field ({error_line(err)})") from None
    try:
        model = nnx.eval_shape(lambda: constructor(*args, **kwargs, rngs=nnx.Rngs(0)))
    except Exception as err:
        raise fail(f"{name} rejects the saved arguments ({error_line(err)})") from None
    if not isinstance(model, nnx.Module):
        raise fail(f"{name}(rngs=...) builds a {type(model).__name__}, not an nnx.Module")
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    names = [nnx_layers.path_name(path) for path, _ in flat]
    if set(names) != set(shapes):
        other = sorted(set(names) ^ set(shapes))
        raise fail(f"{name} builds other variables than were saved (e.g. {other[0]})")
    flat = [(path, variable.replace(jax.ShapeDtypeStruct(tuple(shapes[n]), variable.dtype)))
            for n, (path, variable) in zip(names, flat, strict=True)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    nnx_layers.resize(model, {k: None if v is None else tuple(v) for k, v in gathers.items()})
    nnx_layers.set_modes(model, modes)
    return model


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _shapes(tree) -> dict:
    """{leaf path: shape as stored} (a PRNG key array is stored as its key data)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    stored = lambda leaf: jax.eval_shape(jax.random.key_data, leaf) if jax.dtypes.issubdtype(
        getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key) else leaf
    return {"/".join(leaf_path(path)): tuple(stored(leaf).shape) for path, leaf in flat}


def _first_difference(stored: dict, expected: dict) -> str:
    for name in sorted(set(stored) | set(expected)):
        if stored.get(name) != expected.get(name):
            return f"{name}: saved {stored.get(name)}, expected {expected.get(name)}"
    return ""


def load_pruned(path) -> PruneResult:
    """Read a directory written by `save_pruned`; raises PrunedCheckpointError if it is foreign or corrupt."""
    path = Path(path).absolute()

    def fail(why: str):
        return PrunedCheckpointError(f"load_pruned: {path} is not a palm_jax pruned model: {why}")

    meta = read_tagged_json(path, META, FORMAT, VERSION, fail)
    if meta.get("kind") == "nnx":
        model = _build_nnx(meta, fail)
        state = nnx.state(model)
        restored = _restore(path, nnx.to_pure_dict(state), f"the model {meta['module']} builds", fail)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
        model = nnx.merge(nnx.graphdef(model), state)
        return PruneResult(model, nnx.state(model), meta.get("report", {}))
    cls = _resolve(str(meta.get("module")))
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise fail(f"cannot import the Flax module class {meta.get('module')!r}")
    try:
        model = cls(**{k: _decode(v) for k, v in meta["fields"].items()})
    except Exception as err:
        raise fail(f"{cls.__name__} rejects the saved fields ({error_line(err)})") from None
    try:
        target = abstract_variables(model, tuple(meta.get("report", {}).get("input_shape", ())))
        target = {k: target[k] for k in COLLECTIONS}
    except Exception as err:
        raise fail(f"{cls.__name__} with the saved fields does not initialise ({error_line(err)})") from None
    variables = _restore(path, target, f"{cls.__name__} of the saved fields", fail)
    return PruneResult(model, jax.tree.map(jnp.asarray, variables), meta.get("report", {}))


def _restore(path: Path, target, what: str, fail):
    """The variables checkpoint restored into `target` (its shapes checked first)."""
    if not (path / VARIABLES).is_dir():
        raise fail(f"no {VARIABLES}/ checkpoint")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path / VARIABLES).item_metadata
            if stored is None:
                raise fail(f"{VARIABLES}/ holds no readable Orbax checkpoint")
            mismatch = _first_difference(_shapes(stored), _shapes(target))
            if mismatch:  # checked before restoring: a failed restore leaves Orbax's async reads behind
                raise fail(f"the saved variables do not fit {what} ({mismatch})")
            return checkpointer.restore(path / VARIABLES, target)
    except PrunedCheckpointError:
        raise
    except Exception as err:
        raise fail(f"the variables checkpoint does not restore ({error_line(err)})") from None
