"""Datasets as host uint8 arrays (downloaded once, local npz folders of JPEGs, generated images); on-device
augmentation.

    dataset = load_dataset("cifar10", data_dir="../shared/data/cifar10-jpeg")   # or data_dir=None: download
    images = jax.device_put(dataset.train_images)                              # uint8, once
    batch = dataset.preprocess.train(key, images[epoch_order(key, n, 64)[step]])   # inside the jitted step

Without `data_dir` the dataset is downloaded from its authors' site and prepared once
(`palm_jax.data.download`); nothing here needs TensorFlow.
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
