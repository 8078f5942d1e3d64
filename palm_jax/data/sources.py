"""Dataset sources: local npz folders of JPEGs (decoded once, cached), generated images, and the dispatcher.

An npz folder holds `train.npz`, optionally `test.npz` and, for SVHN, optionally `extra.npz` (SVHN's extra
split, appended to the training images as in the originals), each with three arrays (the format of
`shared/data/cifar10-jpeg`): `jpeg` (uint8, the JPEG files concatenated), `offsets` (int, N + 1 entries; image
i is `jpeg[offsets[i]:offsets[i + 1]]`) and `label` (int, N entries).

Decoded images are cached as `<cache>/<stem>-<sha256 of the npz, 16 hex>-v1.npy`, where `<cache>` is
`$PALM_JAX_CACHE` or `~/.cache/palm_jax`. The key is the file's content hash, so a moved or re-copied file
still hits the cache and an edited one never reads stale images. Writes are atomic (temporary file, then
`os.replace`); caches are read with `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
import warnings
import zipfile
from functools import partial

import numpy as np
from PIL import Image

from palm_jax.data.augment import SVHN_MEAN, SVHN_STD, Preprocess
from palm_jax.utils import atomic_write, first_line


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the originals do with a dataset: its classes, its preprocessing, the splits it trains on."""

    num_classes: int
    preprocess: Preprocess = Preprocess()
    train_splits: tuple[str, ...] = ("train",)


# CIFAR: proximal-ns main.py:83-99, :111-127 (CIFAR-10's mean/std for CIFAR-100 too). SVHN: main.py:100-110
# (train + extra, no crop or flip, SVHN's own mean/std, evaluated on the test split). synthetic: generated.
DATASETS = {
    "cifar10": DatasetSpec(10),
    "cifar100": DatasetSpec(100),
    "svhn": DatasetSpec(10, Preprocess(SVHN_MEAN, SVHN_STD, crop_flip=False), ("train", "extra")),
    "synthetic": DatasetSpec(10),
}
NUM_CLASSES = {name: spec.num_classes for name, spec in DATASETS.items() if name != "synthetic"}
POINT_AT_LOCAL_DATA = "pass --data-dir DIR (make: DATA_DIR=DIR) holding train.npz [test.npz]"
_NPZ_KEYS = ("jpeg", "offsets", "label")
_DECODE_VERSION = "v1"  # bump when decoding changes, so old caches are ignored


class DataNotFoundError(RuntimeError):
    """No usable data. `str(e)` is one line saying what was looked for and how to point at local data."""


class DataFormatError(DataNotFoundError, ValueError):
    """A data file exists but is not in the expected format; `str(e)` is one line naming the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Host arrays of one dataset: uint8 images [N, H, W, 3], int32 labels [N]."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_split: str  # "test" (a real test split) or "val" (held out from the training images)
    num_classes: int
    train_splits: tuple[str, ...] = ("train",)  # the splits the training images come from

    @property
    def preprocess(self) -> Preprocess:
        return DATASETS[self.name].preprocess

    def __post_init__(self):
        for prefix in ("train", "eval"):
            images, labels = getattr(self, f"{prefix}_images"), getattr(self, f"{prefix}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"{prefix}_images must be uint8 [N, H, W, 3], got {images.dtype} "
                                 f"{images.shape}")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(f"{prefix}_labels must be int32 [{len(images)}], got {labels.dtype} "
                                 f"{labels.shape}")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")


def load_dataset(name, data_dir=None, *, train_images=None, val_images=5000, download=None) -> Dataset:
    """Loads `name` ("cifar10", "cifar100", "svhn" or "synthetic") as host uint8 arrays.

    With `data_dir`: `DIR/train.npz` (+ `DIR/test.npz` if present). Without a test file the last
    `val_images` training images become the eval set (`eval_split="val"`). SVHN also trains on `DIR/extra.npz`
    when present (`train_splits` says whether it did). Without `data_dir`: the dataset's train (SVHN: train +
    extra) and test splits, downloaded from its authors' site and prepared on first use
    (`palm_jax.data.download`; `download=False` or `PALM_JAX_DOWNLOAD=0` never downloads, and offline fails at
    once with a `DataNotFoundError`). `train_images=K` keeps the first K training images (after the hold-out).
    Decoded npz images are cached (see the module docstring), so only the first load decodes JPEGs.
    """
    if name == "synthetic":
        if data_dir is not None:
            raise ValueError(f"dataset 'synthetic' is generated and reads no --data-dir (got {data_dir}); "
                             f"name the dataset the folder holds, one of {sorted(NUM_CLASSES)}")
        dataset = synthetic_dataset()
    elif name not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted([*NUM_CLASSES, 'synthetic'])}")
    elif data_dir is not None:
        dataset = _load_npz_dir(name, os.fspath(data_dir), val_images)
    else:
        from palm_jax.data.download import load_split

        splits = DATASETS[name].train_splits
        parts = [load_split(name, split, download=download) for split in splits]
        train = tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        test = load_split(name, "test", download=download)
        dataset = Dataset(name, *train, *test, "test", NUM_CLASSES[name], splits)
    return first_train_images(dataset, train_images)


def first_train_images(dataset: Dataset, count: int | None, *, asked: str | None = None,
                       source=None) -> Dataset:
    """`dataset` with only its first `count` training images (None: all of them); ValueError when it has
    fewer. `asked` / `source`: how the message names the request (default `train_images=<count>`) and the
    data (default the dataset's name)."""
    if count is None:
        return dataset
    available = len(dataset.train_labels)
    if not 0 < count <= available:
        held = (f" (after holding out the last {len(dataset.eval_labels):,} for validation: there is no "
                "test.npz)" if dataset.eval_split == "val" else "")
        raise ValueError(f"{asked or f'train_images={count}'} asked for, but {source or dataset.name} has "
                         f"{available:,} training images{held}")
    return dataclasses.replace(dataset, train_images=dataset.train_images[:count],
                               train_labels=dataset.train_labels[:count])


def _load_npz_dir(name, data_dir, val_images):
    path = partial(os.path.join, data_dir)
    if not os.path.isfile(path("train.npz")):
        raise DataNotFoundError(f"no {name} data: {path('train.npz')} does not exist; {POINT_AT_LOCAL_DATA}")
    num_classes = NUM_CLASSES[name]
    images, labels = read_npz(path("train.npz"), num_classes)
    if os.path.isfile(path("test.npz")):
        eval_images, eval_labels = read_npz(path("test.npz"), num_classes)
        _same_shape(path("test.npz"), eval_images, images)
        split = "test"
    else:
        if not 0 < val_images < len(labels):
            raise ValueError(f"{path('train.npz')} has {len(labels):,} images and no test.npz beside it: too "
                             f"few to hold out the last {val_images:,} for validation; add a test.npz")
        cut = len(labels) - val_images
        images, labels, eval_images, eval_labels = images[:cut], labels[:cut], images[cut:], labels[cut:]
        split = "val"
    splits = ("train",)
    if "extra" in DATASETS[name].train_splits and os.path.isfile(path("extra.npz")):
        extra_images, extra_labels = read_npz(path("extra.npz"), num_classes)
        _same_shape(path("extra.npz"), extra_images, images)
        images, labels = np.concatenate([images, extra_images]), np.concatenate([labels, extra_labels])
        splits = ("train", "extra")
    return Dataset(name, images, labels, eval_images, eval_labels, split, num_classes, splits)


def _same_shape(path, images, train_images):
    if images.shape[1:] != train_images.shape[1:]:
        raise DataFormatError(f"{path}: images are {images.shape[1:]}, but the training images are "
                              f"{train_images.shape[1:]}")


def read_npz(path, num_classes):
    """Validated (uint8 images [N, H, W, 3], int32 labels [N]) from an npz of JPEGs, through the cache."""
    jpeg, offsets, labels = _read_npz_arrays(path, num_classes)
    cache_path = os.path.join(cache_dir(), f"{_stem(path)}-{file_sha256(path)[:16]}-{_DECODE_VERSION}.npy")
    images = _read_cache(cache_path, len(labels))
    if images is None:
        print(f"palm_jax: decoding {len(labels)} images of {path} once (cache: {cache_path})",
              file=sys.stderr)
        images = decode_images(path, jpeg, offsets)
        _write_cache(cache_path, images)
    return images, labels


def _read_npz_arrays(path, num_classes):
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in _NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataFormatError(f"{path}: missing array(s) {missing}; expected {list(_NPZ_KEYS)} "
                                      "(jpeg bytes, N + 1 offsets, N labels)")
            jpeg, offsets, labels = (npz[key] for key in _NPZ_KEYS)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a readable npz file ({type(e).__name__}: {first_line(e)})") from e
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise DataFormatError(f"{path}: 'jpeg' must be a 1-D uint8 array, got {jpeg.dtype} {jpeg.shape}")
    for key, array in (("offsets", offsets), ("label", labels)):
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataFormatError(f"{path}: '{key}' must be a 1-D integer array, got {array.dtype} "
                                  f"{array.shape}")
    if len(offsets) != len(labels) + 1:
        raise DataFormatError(f"{path}: {len(labels)} labels need {len(labels) + 1} offsets, "
                              f"found {len(offsets)}")
    if len(labels) == 0:
        raise DataFormatError(f"{path}: holds no images")
    not_increasing = np.flatnonzero(np.diff(offsets) <= 0)
    if offsets[0] < 0 or offsets[-1] > len(jpeg) or len(not_increasing):
        where = ""
        if len(not_increasing):
            i = not_increasing[0]
            where = f" (offsets[{i}]={offsets[i]}, offsets[{i + 1}]={offsets[i + 1]})"
        raise DataFormatError(f"{path}: offsets must increase strictly from >= 0 to <= {len(jpeg)} (the jpeg "
                              f"size){where}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataFormatError(f"{path}: labels must lie in [0, {num_classes}), found "
                              f"{labels.min()}..{labels.max()}")
    return jpeg, offsets, labels.astype(np.int32)


def decode_images(path, jpeg, offsets):
    """Decodes every image with Pillow (RGB); all must share one shape."""
    images = None
    for i in range(len(offsets) - 1):
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataFormatError(f"{path}: image {i} does not decode ({first_line(e)})") from e
        if images is None:
            images = np.empty((len(offsets) - 1, *array.shape), np.uint8)
        elif array.shape != images.shape[1:]:
            raise DataFormatError(f"{path}: image {i} is {array.shape}, image 0 is {images.shape[1:]}")
        images[i] = array
    return images


def cache_dir():
    """`$PALM_JAX_CACHE`, else ~/.cache/palm_jax."""
    return os.environ.get("PALM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "palm_jax")


def file_sha256(path, chunk_bytes=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache_path, num_images):
    """The cached images, or None when absent or unusable (then they are decoded again)."""
    if not os.path.isfile(cache_path):
        return None
    try:
        images = np.load(cache_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    usable = images.dtype == np.uint8 and images.ndim == 4 and images.shape[::3] == (num_images, 3)
    return images if usable else None


def _write_cache(cache_path, images):
    """Atomic write: readers see the old file or the whole new one. An unwritable cache only warns."""
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        atomic_write(cache_path, lambda f: np.save(f, images, allow_pickle=False))
    except OSError as e:
        warnings.warn(f"palm_jax: could not cache decoded images at {cache_path} ({e}); set PALM_JAX_CACHE "
                      "to a writable folder to skip decoding next time", stacklevel=3)


def synthetic_dataset(num_train=2000, num_eval=500, num_classes=10, image_size=32, seed=0) -> Dataset:
    """Generated, learnable images: each class has a colour and a stripe pattern, plus per-image noise.

    Patterns are symmetric under horizontal flips and survive pad-4 crops, so the usual augmentation keeps
    the classes apart. `eval_split` is "val" (the eval images come from the same generator).
    """
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, (num_classes, 1, 1, 3))
    frequency = rng.integers(1, 5, num_classes)  # stripes per image
    vertical = rng.random(num_classes) < 0.5  # stripes along x or along y
    grid = (np.arange(image_size) + 0.5) / image_size - 0.5  # symmetric about the centre: flip-invariant
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def draw(count):
        labels = rng.integers(0, num_classes, count)
        coords = np.where(vertical[labels, None, None], xx, yy)
        stripes = np.cos(2 * np.pi * frequency[labels, None, None] * coords)[..., None]
        images = colours[labels] + 0.15 * stripes + rng.normal(0.0, 0.12, (count, image_size, image_size, 3))
        return np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels.astype(np.int32)

    return Dataset("synthetic", *draw(num_train), *draw(num_eval), eval_split="val", num_classes=num_classes)


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]

