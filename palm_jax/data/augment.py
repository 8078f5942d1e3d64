"""On-device shuffling and augmentation in pure jax.numpy: jittable, meant to run inside the compiled step.

Images stay uint8 through cropping and flipping; `normalize` is the one place they become floats:
    x = (image / 255 - mean) / std        (per channel)
"""

import jax
import jax.numpy as jnp
from jax import lax

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


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


def epoch_order(key, num_examples, batch_size):
    """A random permutation of range(num_examples) as int32 [num_examples // batch_size, batch_size];
    the last partial batch is dropped so that every step has the same shape. Sizes must be static."""
    num_batches = num_examples // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {num_examples} examples")
    order = jax.random.permutation(key, num_examples)[: num_batches * batch_size]
    return order.reshape(num_batches, batch_size).astype(jnp.int32)
