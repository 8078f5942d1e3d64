"""Datasets as host uint8 arrays (TFDS, local npz folders of JPEGs, generated images); on-device augmentation.

    dataset = load_dataset("cifar10", data_dir="../shared/data/cifar10-jpeg")   # or data_dir=None: TFDS
    images = jax.device_put(dataset.train_images)                              # uint8, once
    batch = dataset.preprocess.train(key, images[epoch_order(key, n, 64)[step]])   # inside the jitted step

TensorFlow Datasets is imported only when `load_dataset` is called without `data_dir`.
"""

from palm_jax.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    SVHN_MEAN,
    SVHN_STD,
    Preprocess,
    epoch_batches,
    epoch_order,
    normalize,
    random_crop_flip,
)
from palm_jax.data.sources import (
    DATASETS,
    NUM_CLASSES,
    DataFormatError,
    DataNotFoundError,
    Dataset,
    load_dataset,
    synthetic_dataset,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "NUM_CLASSES",
    "DataFormatError",
    "DataNotFoundError",
    "Dataset",
    "Preprocess",
    "SVHN_MEAN",
    "SVHN_STD",
    "epoch_batches",
    "epoch_order",
    "load_dataset",
    "normalize",
    "random_crop_flip",
    "synthetic_dataset",
]
