"""The TensorFlow Datasets source, through `tfds.testing.mock_data` (no network, no TensorFlow needed)."""

import sys
import time
from unittest import mock

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from palm_jax.data import DataNotFoundError, load_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def empty_tfds_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.delenv("PALM_JAX_TFDS_DOWNLOAD", raising=False)


@pytest.mark.parametrize("name, tfds_name, num_classes", [
    ("cifar10", "cifar10", 10), ("cifar100", "cifar100", 100), ("svhn", "svhn_cropped", 10)])
def test_mocked_tfds_train_and_test_splits(name, tfds_name, num_classes):
    train_splits = ("train", "extra") if name == "svhn" else ("train",)  # SVHN trains on train + extra
    with tfds.testing.mock_data(num_examples=6):
        data = load_dataset(name, download=True)  # the mocked download is a no-op
        expected = {split: [tfds.data_source(tfds_name, split=split)[i] for i in range(6)]
                    for split in ("train", "extra", "test") if split != "extra" or name == "svhn"}
    expected["train"] = [example for split in train_splits for example in expected[split]]
    assert data.name == name and data.eval_split == "test" and data.num_classes == num_classes
    assert data.train_splits == train_splits
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.eval_images, data.eval_labels)):
        n = len(expected[split])
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        np.testing.assert_array_equal(images, [example["image"] for example in expected[split]])
        np.testing.assert_array_equal(labels, [example["label"] for example in expected[split]])


def test_mocked_tfds_train_subset_and_env_download(monkeypatch):
    monkeypatch.setenv("PALM_JAX_TFDS_DOWNLOAD", "1")
    with tfds.testing.mock_data(num_examples=5):
        full = load_dataset("cifar10")
        subset = load_dataset("cifar10", train_images=2)
    np.testing.assert_array_equal(subset.train_images, full.train_images[:2])
    np.testing.assert_array_equal(subset.eval_images, full.eval_images)


def test_unprepared_tfds_fails_at_once_naming_data_dir(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as error:
        load_dataset("cifar10")  # nothing in TFDS_DATA_DIR and no download asked for: no network access
    assert time.perf_counter() - start < 20  # the offline download would retry for minutes
    text = str(error.value)
    assert "\n" not in text
    for needle in (str(tmp_path / "tfds"), "PALM_JAX_TFDS_DOWNLOAD=1", "--data-dir", "DATA_DIR"):
        assert needle in text, (needle, text)


def test_tfrecord_data_without_tensorflow_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
    with tfds.testing.mock_data(num_examples=3), _tfrecord_only(), pytest.raises(DataNotFoundError) as error:
        load_dataset("cifar10", download=True)
    text = str(error.value)
    assert "\n" not in text and "tensorflow" in text and "--data-dir" in text


def test_tfrecord_data_is_read_through_tf_data():
    pytest.importorskip("tensorflow")
    with tfds.testing.mock_data(num_examples=5):
        with _tfrecord_only():
            data = load_dataset("cifar10", download=True)
        expected = list(tfds.as_numpy(tfds.load("cifar10", split="train")))
    np.testing.assert_array_equal(data.train_images, [example["image"] for example in expected])
    np.testing.assert_array_equal(data.train_labels, [example["label"] for example in expected])
    assert data.train_labels.dtype == np.int32 and data.eval_images.shape == (5, 32, 32, 3)


def _tfrecord_only():
    """Makes the builder behave like data prepared in TFDS's default TFRecord format (no random access)."""
    return mock.patch.object(tfds.core.DatasetBuilder, "as_data_source",
                             side_effect=NotImplementedError("TFRecord has no random access"))
