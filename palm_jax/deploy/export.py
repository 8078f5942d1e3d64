"""A model as a serialized `jax.export` artifact: served from uint8 images without the model's Python code.

    export_model(model, variables, "deploy/vgg19", input_shape=(32, 32, 3), mean=CIFAR_MEAN, std=CIFAR_STD)
    serve = load_exported("deploy/vgg19")          # in any process with jax; no palm_jax.models, no flax
    logits = serve(images_uint8)                    # [n, 32, 32, 3] uint8, any n -> [n, classes] float32

The directory:

    model.jax       jax.export.Exported.serialize(): StableHLO of images -> logits with a symbolic batch
                    dimension, lowered for CPU and CUDA GPUs; it takes (weights, images) and does the
                    normalisation inside: x = (images / 255 - mean) / std per channel, then the eval forward
    weights.npz     the variables, one array per leaf, in the artifact's argument order (`np.load` with
                    allow_pickle=False); bfloat16 leaves are stored as raw 2-byte values
    exported.json   {"format": "palm_jax.exported", "version": 1, input and output shapes and dtypes, mean,
                    std, num_classes, params, flops, platforms, jax version, sha256 of the two files,
                    description (e.g. the source run)}

Weights are arguments rather than constants inside the artifact: the artifact stays a few kB of program, it
exports and compiles faster (XLA handles 80 MB of constants slowly), and the weights stay readable with numpy.
"""

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from palm_jax.utils import read_tagged_json

FORMAT, VERSION = "palm_jax.exported", 1
META, ARTIFACT, WEIGHTS = "exported.json", "model.jax", "weights.npz"
PLATFORMS = ("cpu", "cuda")
NORMALISATION = "x = (images / 255 - mean) / std per channel"


class ExportError(ValueError):
    """An export directory that cannot be written or read (foreign, corrupt, truncated): one-line message."""


def export_model(model, variables, out_dir, *, input_shape, mean, std, flops=None, description=None,
                 force=False, platforms=PLATFORMS) -> Path:
    """Write `model.apply(variables, ., train=False)` behind uint8 input normalisation as a `jax.export`
    artifact with its weights and description (see the module docstring); returns the directory.

    Args:
      model, variables: a Flax Linen module with `__call__(x, train)` and its variables (e.g.
        `{"params", "batch_stats"}`); the module's compute dtype is kept, logits are returned as float32.
      out_dir: the directory; one that exists and is not empty is refused unless `force` (then only the three
        files of an export are replaced; nothing else in it is touched).
      input_shape: one image's shape (H, W, C); the batch dimension is symbolic.
      mean, std: per-channel normalisation of images / 255, C values each (the training pipeline's:
        `palm_jax.data.CIFAR_MEAN`, `CIFAR_STD`).
      flops: forward FLOPs per image to record (e.g. a prune report's `flops_after`), or None.
      description: JSON-able facts to record (source run, dataset, ...).
      platforms: the `jax.export` platforms to lower for.
    """
    from palm_jax.data.augment import normalize
    from palm_jax.utils import count_params

    out = check_out_dir(out_dir, force)
    input_shape = tuple(int(d) for d in input_shape)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(input_shape) != 3 or not len(mean) == len(std) == input_shape[-1]:
        raise ExportError(f"export: input_shape must be (H, W, C) with C mean and std values; got "
                          f"{input_shape}, {len(mean)} means, {len(std)} stds")
    flat, treedef = jax.tree_util.tree_flatten_with_path(dict(variables))
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    weights = [np.asarray(leaf) for _, leaf in flat]

    def serve(weights, images):
        x = normalize(images, mean, std)
        return model.apply(treedef.unflatten(weights), x, train=False).astype(jnp.float32)

    batch = jax.export.symbolic_shape("batch")[0]
    specs = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
             jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8))
    try:
        exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*specs)
    except Exception as err:
        raise ExportError(f"export: {type(model).__name__} does not export with a symbolic batch "
                          f"({type(err).__name__}: {_first_line(err)})") from err
    (logits,) = exported.out_avals if len(exported.out_avals) == 1 else (None,)
    if logits is None or len(logits.shape) != 2:
        raise ExportError(f"export: {type(model).__name__} must return one [batch, classes] array")
    blob = bytes(exported.serialize())
    out.mkdir(parents=True, exist_ok=True)
    _write(out / ARTIFACT, lambda f: f.write(blob))
    arrays = {name: _storable(w) for name, w in zip(names, weights, strict=True)}
    _write(out / WEIGHTS, lambda f: np.savez(f, **arrays))
    meta = {
        "format": FORMAT, "version": VERSION,
        "input": {"shape": [None, *input_shape], "dtype": "uint8", "mean": mean, "std": std,
                  "normalisation": NORMALISATION},
        "output": {"shape": [None, int(logits.shape[1])], "dtype": "float32", "what": "logits"},
        "num_classes": int(logits.shape[1]),
        "params": count_params(variables.get("params", variables)),
        "flops": None if flops is None else float(flops),
        "compute_dtype": jnp.dtype(getattr(model, "dtype", None) or jnp.float32).name,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "weights": names,
        "sha256": {name: _sha256(out / name) for name in (ARTIFACT, WEIGHTS)},
        "description": description or {},
    }
    text = json.dumps(meta, indent=1)
    _write(out / META, lambda f: f.write(text.encode()))  # last: a half-written export has no description
    return out


def check_out_dir(out_dir, force: bool) -> Path:
    """`out_dir` as a Path; ExportError if it is a file, or a non-empty directory without `force`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} is a file; pick a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"export: {out} exists and is not empty; pick a new directory or pass force=True "
                          "(--force) to replace the export files in it")
    return out


def _write(path: Path, fill) -> None:
    """Write through a temporary file renamed into place, so that `path` is either old or complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        fill(f)
    os.replace(tmp, path)


def _storable(weight: np.ndarray) -> np.ndarray:
    """numpy-named dtypes as they are; others (bfloat16) as raw unsigned ints of the same width."""
    if weight.dtype.kind in "biuf":
        return weight
    return weight.view(f"u{weight.dtype.itemsize}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else type(err).__name__


class ExportedModel:
    """A loaded export: `model(images)` maps uint8 [n, H, W, C] images (numpy or jax) to float32 [n, classes]
    logits (a jax.Array) on the default device; `meta` is exported.json. Compiled once per batch size."""

    def __init__(self, exported, weights: list, meta: dict):
        self.meta = meta
        self.input_shape = tuple(meta["input"]["shape"][1:])
        self.num_classes = int(meta["num_classes"])
        self._weights = jax.device_put(weights)
        self._call = jax.jit(exported.call)

    def __call__(self, images):
        images = images if isinstance(images, jax.Array) else np.asarray(images)
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.input_shape or images.ndim != 4:
            raise ValueError(f"exported model: expected uint8 images of shape [batch, "
                             f"{', '.join(map(str, self.input_shape))}], got {images.dtype} "
                             f"{list(images.shape)} (add a batch axis; pass raw 0-255 pixels, not scaled)")
        return self._call(self._weights, images)


def load_exported(path) -> ExportedModel:
    """Read a directory written by `export_model`; needs jax and numpy only (not the model's code).

    Raises ExportError (one line) for a directory that is foreign, incomplete, corrupt or truncated, or that
    was not exported for this process's platform.
    """
    path = Path(path).absolute()

    def fail(why: str):
        return ExportError(f"load_exported: {path} is not a usable palm_jax export: {why}")

    meta = read_tagged_json(path, META, FORMAT, VERSION, fail, missing=(
        " (make an export with `python -m palm_jax.cli export CHECKPOINT --out DIR` or export_model)"))
    try:
        sums, names = dict(meta["sha256"]), list(meta["weights"])
        meta["input"]["shape"], int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as err:
        raise fail(f"{META} lacks a field ({type(err).__name__}: {_first_line(err)})") from None
    for name in (ARTIFACT, WEIGHTS):
        if not (path / name).is_file():
            raise fail(f"no {name}")
        if _sha256(path / name) != sums.get(name):
            raise fail(f"{name} does not match its sha256 in {META} (truncated or modified); export again")
    try:
        exported = jax.export.deserialize(bytearray((path / ARTIFACT).read_bytes()))
    except Exception as err:
        raise fail(f"{ARTIFACT} does not deserialize ({type(err).__name__}: {_first_line(err)})") from None
    platform = jax.export.default_export_platform()
    if platform not in exported.platforms:
        raise fail(f"exported for {', '.join(exported.platforms)}, this process runs on {platform}; export "
                   f"again with platforms=(..., {platform!r})")
    return ExportedModel(exported, _read_weights(path / WEIGHTS, names, exported.in_avals, fail), meta)


def _read_weights(file: Path, names: list, in_avals, fail) -> list:
    """The weights in argument order, checked against the artifact's argument shapes and dtypes."""
    expected = in_avals[: len(in_avals) - 1]  # the last argument is the images
    if len(names) != len(expected):
        raise fail(f"{META} names {len(names)} weights, {ARTIFACT} takes {len(expected)}")
    try:
        with np.load(file, allow_pickle=False) as stored:
            weights = [stored[name] for name in names]
    except Exception as err:
        raise fail(f"{WEIGHTS} does not read ({type(err).__name__}: {_first_line(err)})") from None
    for i, (name, aval) in enumerate(zip(names, expected, strict=True)):
        weight = weights[i]
        if weight.dtype != aval.dtype and weight.dtype == _storable(np.zeros(0, aval.dtype)).dtype:
            weight = weights[i] = weight.view(aval.dtype)  # stored as raw bits (_storable)
        if weight.shape != tuple(aval.shape) or weight.dtype != aval.dtype:
            raise fail(f"weight {name} is {weight.dtype}{list(weight.shape)}, {ARTIFACT} takes "
                       f"{aval.dtype}{list(aval.shape)}")
    return weights
