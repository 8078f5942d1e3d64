"""Data sources (npz of JPEGs + cache, generated images, errors) and on-device augmentation."""

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from palm_jax.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    SVHN_MEAN,
    SVHN_STD,
    DataFormatError,
    DataNotFoundError,
    Dataset,
    epoch_batches,
    epoch_order,
    load_dataset,
    normalize,
    random_crop_flip,
    sources,
    synthetic_dataset,
)
from palm_jax.data.augment import crop_flip_params


def _smooth_images(count, seed, size=32):
    """Images JPEG keeps nearly exact: a flat colour per image plus a gentle ramp (channels distinct)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 200, (count, 1, 1, 3))
    ramp = np.linspace(0, 30, size)[None, None, :, None] * np.array([1, 0, 0])  # red grows left to right
    images = np.broadcast_to(colours + ramp, (count, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def _write_npz(path, images, labels):
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=100, subsampling=0)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, label=np.asarray(labels, np.int64))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PALM_JAX_CACHE", str(folder))
    return folder


@pytest.fixture
def npz_dir(tmp_path, cache):
    folder = tmp_path / "data"
    folder.mkdir()
    images, labels = _smooth_images(30, seed=0), np.arange(30) % 10
    _write_npz(folder / "train.npz", images, labels)
    return folder, images, labels


def _assert_one_line(error, *needles):
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


# ---------------------------------------------------------------- npz folders


def test_npz_without_test_file_holds_out_last_images_as_val(npz_dir):
    folder, images, labels = npz_dir
    data = load_dataset("cifar10", folder, val_images=10)
    assert data.eval_split == "val" and data.num_classes == 10 and data.name == "cifar10"
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    np.testing.assert_array_equal(data.train_labels, labels[:20])
    np.testing.assert_array_equal(data.eval_labels, labels[20:])
    # JPEG at quality 100 on smooth images: decoded pixels within a few levels, channel order kept.
    assert np.abs(data.train_images.astype(int) - images[:20]).max() <= 4
    assert np.abs(data.eval_images.astype(int) - images[20:]).max() <= 4


def test_train_images_subset_is_taken_after_the_hold_out(npz_dir):
    folder, _, labels = npz_dir
    full = load_dataset("cifar10", folder, val_images=10)
    subset = load_dataset("cifar10", folder, train_images=5, val_images=10)
    np.testing.assert_array_equal(subset.train_images, full.train_images[:5])
    np.testing.assert_array_equal(subset.train_labels, labels[:5])
    np.testing.assert_array_equal(subset.eval_images, full.eval_images)
    with pytest.raises(ValueError, match="train_images=21"):
        load_dataset("cifar10", folder, train_images=21, val_images=10)


def test_test_npz_is_the_eval_split(npz_dir):
    folder, images, labels = npz_dir
    test_images = _smooth_images(7, seed=1)
    _write_npz(folder / "test.npz", test_images, [3] * 7)
    data = load_dataset("cifar10", folder)
    assert data.eval_split == "test" and len(data.train_labels) == 30
    np.testing.assert_array_equal(data.eval_labels, [3] * 7)
    assert np.abs(data.eval_images.astype(int) - test_images).max() <= 4


def test_decoded_images_are_cached_by_content(npz_dir, cache, monkeypatch):
    folder, _, _ = npz_dir
    first = load_dataset("cifar10", folder, val_images=10)
    (cached,) = os.listdir(cache)
    assert cached.startswith("train-") and cached.endswith(".npy")
    assert np.load(cache / cached, allow_pickle=False).shape == (30, 32, 32, 3)

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    decode_images = sources.decode_images
    monkeypatch.setattr(sources, "decode_images", no_decoding)
    second = load_dataset("cifar10", folder, val_images=10)
    np.testing.assert_array_equal(second.train_images, first.train_images)
    monkeypatch.setattr(sources, "decode_images", decode_images)

    # Other content under the same path: a new key, never the stale images.
    _write_npz(folder / "train.npz", _smooth_images(30, seed=5), np.zeros(30))
    changed = load_dataset("cifar10", folder, val_images=10)
    assert not np.array_equal(changed.train_images, first.train_images)
    assert len([name for name in os.listdir(cache) if name.endswith(".npy")]) == 2
    assert not [name for name in os.listdir(cache) if name.endswith(".tmp")]


def test_corrupt_cache_is_decoded_again(npz_dir, cache):
    folder, _, _ = npz_dir
    first = load_dataset("cifar10", folder, val_images=10)
    (cached,) = os.listdir(cache)
    (cache / cached).write_bytes(b"not a numpy file")
    again = load_dataset("cifar10", folder, val_images=10)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    assert np.load(cache / cached, allow_pickle=False).shape == (30, 32, 32, 3)


def _corrupt(path, **changes):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})


@pytest.mark.parametrize("change, message", [
    (dict(offsets=None), "missing array(s) ['offsets']"),
    (dict(label=np.zeros(29, np.int64)), "29 labels need 30 offsets, found 31"),
    (dict(label=np.full(30, 10)), "labels must lie in [0, 10)"),
    (dict(offsets="swap"), "offsets must increase strictly"),
    (dict(jpeg="garbage"), "image 0 does not decode"),
])
def test_bad_npz_is_a_one_line_error_naming_the_file(npz_dir, change, message):
    folder, _, _ = npz_dir
    path = folder / "train.npz"
    with np.load(path) as npz:
        offsets, jpeg = npz["offsets"].copy(), npz["jpeg"].copy()
    if change.get("offsets") == "swap":
        offsets[[3, 4]] = offsets[[4, 3]]
        change = dict(offsets=offsets)
    if change.get("jpeg") == "garbage":
        jpeg[: offsets[1]] = 7
        change = dict(jpeg=jpeg)
    _corrupt(path, **change)
    with pytest.raises(DataFormatError) as error:
        load_dataset("cifar10", folder)
    _assert_one_line(error.value, str(path), message)


def test_unreadable_npz_is_a_one_line_error(tmp_path, cache):
    (tmp_path / "train.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataFormatError) as error:
        load_dataset("cifar10", tmp_path)
    _assert_one_line(error.value, str(tmp_path / "train.npz"), "not a readable npz")


def test_missing_train_npz_names_what_was_looked_for_and_the_fix(tmp_path, cache):
    with pytest.raises(DataNotFoundError) as error:
        load_dataset("cifar10", tmp_path)
    _assert_one_line(error.value, str(tmp_path / "train.npz"), "--data-dir", "DATA_DIR")


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("imagenet", "/nonexistent")


def test_data_package_never_imports_tensorflow(npz_dir):
    folder, _, _ = npz_dir
    code = ("import sys; from palm_jax.data import load_dataset; "
            f"load_dataset('cifar10', {str(folder)!r}, val_images=10); "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ---------------------------------------------------------------- generated images


def test_synthetic_dataset_is_deterministic_and_learnable():
    data = synthetic_dataset(num_train=600, num_eval=200, num_classes=5, image_size=16, seed=3)
    assert isinstance(data, Dataset) and data.eval_split == "val" and data.num_classes == 5
    assert data.train_images.shape == (600, 16, 16, 3) and data.train_images.dtype == np.uint8
    assert set(np.unique(data.train_labels)) == set(range(5))
    again = synthetic_dataset(num_train=600, num_eval=200, num_classes=5, image_size=16, seed=3)
    np.testing.assert_array_equal(again.train_images, data.train_images)
    other = synthetic_dataset(num_train=600, num_eval=200, num_classes=5, image_size=16, seed=4)
    assert not np.array_equal(other.train_images, data.train_images)
    # Learnable: nearest class mean (fit on train) classifies the eval images well; chance is 20%.
    train = data.train_images.reshape(600, -1).astype(float)
    means = np.stack([train[data.train_labels == c].mean(0) for c in range(5)])
    distances = ((data.eval_images.reshape(200, 1, -1) - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == data.eval_labels).mean() > 0.9
    # Not trivial: single pixels are noisy.
    assert data.train_images[data.train_labels == 0].std(0).mean() > 10


def test_load_dataset_synthetic_subset(tmp_path):
    data = load_dataset("synthetic", train_images=100)
    assert len(data.train_labels) == 100 and data.name == "synthetic"
    with pytest.raises(ValueError, match="reads no --data-dir"):
        load_dataset("synthetic", tmp_path)


# ---------------------------------------------------------------- augmentation


def _numpy_crop_flip(images, offsets, flips, pad):
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_random_crop_flip_matches_numpy_reference():
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    key = jax.random.key(42)
    offsets, flips = map(np.asarray, crop_flip_params(key, 64, pad=4))
    assert offsets.min() == 0 and offsets.max() == 8  # both extremes of pad-4 crops occur in 128 draws
    assert 0.25 < flips.mean() < 0.75
    out = random_crop_flip(key, jnp.asarray(images), pad=4)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, _numpy_crop_flip(images, offsets, flips, pad=4))
    unflipped = random_crop_flip(key, jnp.asarray(images), pad=4, flip=False)
    np.testing.assert_array_equal(unflipped, _numpy_crop_flip(images, offsets, np.zeros(64, bool), pad=4))


def test_flip_is_a_left_right_mirror():
    images = np.random.default_rng(1).integers(0, 256, (16, 5, 7, 3), dtype=np.uint8)
    key = jax.random.key(0)
    _, flips = crop_flip_params(key, 16, pad=0)
    out = np.asarray(random_crop_flip(key, jnp.asarray(images), pad=0))
    assert flips.any() and not flips.all()
    for image, result, flipped in zip(images, out, np.asarray(flips), strict=True):
        np.testing.assert_array_equal(result, image[:, ::-1] if flipped else image)


def test_augmentation_jits_and_is_deterministic_per_key():
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8))
    jitted = jax.jit(random_crop_flip, static_argnames=("pad", "flip"))
    key = jax.random.key(7)
    np.testing.assert_array_equal(jitted(key, images), random_crop_flip(key, images))
    np.testing.assert_array_equal(jitted(key, images), jitted(key, images))
    assert not np.array_equal(jitted(jax.random.key(8), images), jitted(key, images))


def test_normalize_matches_formula():
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    out = jax.jit(normalize)(jnp.asarray(images))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    half = normalize(jnp.asarray(images), dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected, rtol=1e-2, atol=2e-2)
    custom = normalize(jnp.asarray(images), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(custom, (images / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_epoch_order_is_a_permutation_with_drop_remainder():
    order_fn = jax.jit(epoch_order, static_argnums=(1, 2))
    order = np.asarray(order_fn(jax.random.key(0), 103, 10))
    assert order.shape == (10, 10) and order.dtype == np.int32
    assert len(np.unique(order)) == 100 and order.min() >= 0 and order.max() < 103
    np.testing.assert_array_equal(order, epoch_order(jax.random.key(0), 103, 10))
    other = np.asarray(order_fn(jax.random.key(1), 103, 10))
    assert not np.array_equal(other, order)
    exact = np.asarray(epoch_order(jax.random.key(0), 100, 10))
    np.testing.assert_array_equal(np.sort(exact.ravel()), np.arange(100))  # nothing dropped when it divides
    with pytest.raises(ValueError, match="batch_size=64"):
        epoch_order(jax.random.key(0), 10, 64)


def test_epoch_batches_keep_the_last_partial_batch():
    full, last = jax.jit(epoch_batches, static_argnums=(1, 2))(jax.random.key(0), 103, 10)
    assert full.shape == (10, 10) and last.shape == (3,) and last.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(np.r_[np.ravel(full), last]), np.arange(103))  # each example once
    np.testing.assert_array_equal(full, epoch_order(jax.random.key(0), 103, 10))  # the same full batches
    assert epoch_batches(jax.random.key(0), 100, 10)[1].shape == (0,)


def test_preprocess_of_svhn_only_normalises_with_its_own_statistics():
    images = jnp.asarray(np.random.default_rng(4).integers(0, 256, (8, 6, 6, 3), dtype=np.uint8))
    svhn, cifar = DATASETS["svhn"].preprocess, DATASETS["cifar10"].preprocess
    expected = (np.asarray(images) / 255.0 - np.array(SVHN_MEAN)) / np.array(SVHN_STD)
    for key in (jax.random.key(0), jax.random.key(1)):  # no randomness: neither crop nor flip
        np.testing.assert_allclose(svhn.train(key, images), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(svhn.eval(images), expected, rtol=1e-5, atol=1e-5)
    key = jax.random.key(2)
    np.testing.assert_array_equal(cifar.train(key, images), normalize(random_crop_flip(key, images)))
