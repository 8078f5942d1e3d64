"""TensorFlow Datasets source: the only module importing `tensorflow_datasets`, and only inside `load_tfds`.

Reading prefers TFDS's random-access data source (array_record files, no TensorFlow needed); data prepared in
TFDS's default TFRecord format is read through `tf.data` and needs TensorFlow. Nothing is downloaded unless
asked (`download=True` or `PALM_JAX_TFDS_DOWNLOAD=1`): offline, `tfds.load` retries for minutes before it
fails, so missing data is reported at once instead. A download prepares array_record files (TFDS's CIFAR and
SVHN generators themselves need TensorFlow and network access).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import numpy as np

from palm_jax.data.sources import POINT_AT_LOCAL_DATA, DataNotFoundError, first_line

TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
DOWNLOAD_ENV = "PALM_JAX_TFDS_DOWNLOAD"


def download_requested(download=None) -> bool:
    """`download` if given, else whether `$PALM_JAX_TFDS_DOWNLOAD` is set to a true value."""
    if download is not None:
        return bool(download)
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load_tfds(name, *, download=None, train_splits=("train",)):
    """((train images, labels), (test images, labels), num_classes) of `name` from TFDS, as numpy arrays; the
    training images are those of `train_splits` in order (SVHN: ("train", "extra"))."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataNotFoundError(f"no --data-dir given and TensorFlow Datasets is not importable ({e}); "
                                f"pip install tensorflow-datasets, or {POINT_AT_LOCAL_DATA}") from None
    tfds_name = TFDS_NAMES[name]
    with _quiet_absl():
        # $TFDS_DATA_DIR read now: TFDS reads it once, at import.
        builder = tfds.builder(tfds_name, data_dir=os.environ.get("TFDS_DATA_DIR") or None)
        if not builder.is_prepared():
            if not download_requested(download):
                raise DataNotFoundError(
                    f"TFDS {tfds_name} is not prepared in {builder.data_dir} ($TFDS_DATA_DIR); to download "
                    f"it set {DOWNLOAD_ENV}=1 (needs network and tensorflow), or {POINT_AT_LOCAL_DATA}")
            _download(builder, tfds_name)
        num_classes = builder.info.features["label"].num_classes
        parts = [_read_split(tfds, builder, split) for split in train_splits]
        train = tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return train, _read_split(tfds, builder, "test"), num_classes


def _download(builder, tfds_name):
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # network, missing tensorflow, disk: all become one line naming the alternative
        hint = f"pip install {e.name}; " if isinstance(e, ModuleNotFoundError) and e.name else ""
        raise DataNotFoundError(f"downloading TFDS {tfds_name} failed ({type(e).__name__}: {first_line(e)}); "
                                f"{hint}or {POINT_AT_LOCAL_DATA}") from e


def _read_split(tfds, builder, split):
    try:
        examples = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError):  # not array_record but TFRecord files: read through tf.data
        if importlib.util.find_spec("tensorflow") is None:  # checked here: TFDS's own failure prints a banner
            raise DataNotFoundError(
                f"TFDS {builder.name} in {builder.data_dir} is stored as TFRecord, which needs tensorflow to "
                f"read; pip install tensorflow-cpu, or {POINT_AT_LOCAL_DATA}") from None
        batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=1024)))
        images = np.concatenate([batch["image"] for batch in batches])
        labels = np.concatenate([batch["label"] for batch in batches])
    else:
        examples = [examples[i] for i in range(len(examples))]
        images = np.stack([np.asarray(example["image"]) for example in examples])
        labels = np.array([example["label"] for example in examples])
    return images.astype(np.uint8, copy=False), labels.astype(np.int32)


@contextlib.contextmanager
def _quiet_absl():
    """Hides TFDS's absl warnings (e.g. about absent dataset_info.json) so that errors stay one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

