"""On-device shuffling and augmentation in pure jax.numpy: jittable, meant to run inside the compiled step.

Images stay uint8 through cropping and flipping; `normalize` is the one place they become floats:
    x = (image / 255 - mean) / std        (per channel)
A dataset's `Preprocess` says which mean and std, and whether training crops and flips.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# The originals' normalisation: proximal-ns main.py:91 (CIFAR-10) and :119 (CIFAR-100 uses CIFAR-10's too);
# network-slimming main.py:73 and :90. SVHN: proximal-ns main.py:102, :104, :109.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
SVHN_MEAN = (0.4376821, 0.4437697, 0.47280442)
SVHN_STD = (0.19803012, 0.20101562, 0.19703614)


def normalize(images_uint8, mean=CIFAR_MEAN, std=CIFAR_STD, dtype=jnp.float32):
    """(images / 255 - mean) / std per channel, computed in float32 and returned as `dtype`."""
    scaled = images_uint8.astype(jnp.float32) / 255.0
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return ((scaled - mean) / std).astype(dtype)


def crop_flip_params(key, batch_size, pad=4):
    """The random choices of `random_crop_flip`: top-left crop offsets int32 [B, 2] in [0, 2 * pad] (row,
    column) into the padded images, and horizontal-flip flags bool [B] (each True with probability 1/2)."""
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    return offsets, flips


def random_crop_flip(key, images_uint8, pad=4, flip=True):
    """Zero-pads each image by `pad` pixels, crops a random H x W window and, if `flip`, mirrors it
    left-right with probability 1/2; per image, uint8 [B, H, W, C] in and out."""
    batch_size, *image_shape = images_uint8.shape
    offsets, flips = crop_flip_params(key, batch_size, pad)
    padded = jnp.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda image, offset: lax.dynamic_slice(image, (offset[0], offset[1], 0), image_shape)
    images = jax.vmap(crop)(padded, offsets)
    if flip:
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images


class Preprocess(NamedTuple):
    """How a dataset's uint8 images become a network's input (hashable: a static argument of the steps).

    Training: pad-4 random crop + horizontal flip when `crop_flip` (CIFAR in both originals, proximal-ns
    main.py:87-89; none for SVHN, main.py:101-104), then `normalize` with `mean`, `std`; evaluation only
    normalises."""

    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    crop_flip: bool = True

    def train(self, key, images_uint8, dtype=jnp.float32):
        if self.crop_flip:
            images_uint8 = random_crop_flip(key, images_uint8)
        return normalize(images_uint8, self.mean, self.std, dtype)

    def eval(self, images_uint8, dtype=jnp.float32):
        return normalize(images_uint8, self.mean, self.std, dtype)


def epoch_batches(key, num_examples, batch_size):
    """One epoch's data order: a random permutation of range(num_examples) as (full batches int32
    [num_examples // batch_size, batch_size], the last partial batch int32 [num_examples % batch_size]).
    Every example is visited once, as PyTorch's DataLoader does by default (drop_last=False): 50,000 images
    in batches of 64 are 781 full batches and one of 16. Sizes must be static."""
    num_batches = num_examples // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {num_examples} examples")
    order = jax.random.permutation(key, num_examples).astype(jnp.int32)
    cut = num_batches * batch_size
    return order[:cut].reshape(num_batches, batch_size), order[cut:]


def epoch_order(key, num_examples, batch_size):
    """The full batches of `epoch_batches` (int32 [num_examples // batch_size, batch_size])."""
    return epoch_batches(key, num_examples, batch_size)[0]
