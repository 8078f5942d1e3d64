"""The compiled train and eval steps: the data already on the device, augmentation inside the step.

    train_step(state, data, batch_idx, key)   one SGD step on the batch `data[batch_idx]`, augmented by `key`
    train_chunk(state, data, idx, num_steps)  the first `num_steps` rows of `idx` [K, B] in ONE dispatch
    evaluate(apply_fn, variables, eval_data)  loss and top-1 accuracy over a whole split

`preprocess` (a static `palm_jax.data.Preprocess`, default CIFAR's: crop + flip, CIFAR mean/std) is the
dataset's: `Dataset.preprocess`.

Every function is pure in its array arguments, so data parallelism only needs the arrays placed with a
sharding; nothing here reads the host.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from palm_jax import prox
from palm_jax.data.augment import Preprocess
from palm_jax.train.state import TrainState, float32_apply

CIFAR = Preprocess()

STEP_METRICS = ("loss", "correct", "penalty")


class DeviceData(NamedTuple):
    """A split on the device: uint8 images [N, H, W, 3] and int32 labels [N]."""

    images: jax.Array
    labels: jax.Array


class EvalData(NamedTuple):
    """An eval split on the device in fixed-size batches: images [nb, b, H, W, 3], labels and a validity
    mask [nb, b] (the last batch is padded)."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array

    @property
    def size(self) -> int:
        return int(self.mask.sum())


def to_device(images: np.ndarray, labels: np.ndarray) -> DeviceData:
    return DeviceData(jnp.asarray(images, jnp.uint8), jnp.asarray(labels, jnp.int32))


def to_eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> EvalData:
    """Pad a split to whole batches (masked out of every sum) and put it on the device."""
    n = len(labels)
    batch_size = min(batch_size, n)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.arange(nb * batch_size) < n
    shape = (nb, batch_size)
    return EvalData(
        jnp.asarray(images.reshape(*shape, *images.shape[1:]), jnp.uint8),
        jnp.asarray(labels.reshape(shape), jnp.int32),
        jnp.asarray(mask.reshape(shape)),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(
    state: TrainState, data: DeviceData, batch_idx: jax.Array, key: jax.Array, *, dtype=jnp.float32,
    preprocess: Preprocess = CIFAR,
):
    """One step: gather the batch, augment (`preprocess`: random crop + flip for CIFAR) and normalise to
    `dtype`, forward with batch statistics, backward, optimiser update. Returns the new state and this step's
    loss, correct count and sum |scale| (the penalty before the update, like the loss)."""
    labels = data.labels[batch_idx]
    images = preprocess.train(key, data.images[batch_idx], dtype)

    def loss_fn(params):
        logits, updates = state.apply_fn(state.variables(params), images, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
        "penalty": prox.l1_penalty(state.params).astype(jnp.float32),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, metrics


def step_key(state: TrainState) -> jax.Array:
    """The augmentation key of the step about to run: a function of (rng, step) only, so resume replays it."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, 0), state.step)


def epoch_key(rng: jax.Array, epoch) -> jax.Array:
    """The key of epoch `epoch`'s data order: a function of (the state's rng, epoch) only."""
    return jax.random.fold_in(jax.random.fold_in(rng, 1), epoch)


@functools.partial(jax.jit, static_argnames=("dtype", "preprocess"), donate_argnums=(0,))
def train_chunk(
    state: TrainState, data: DeviceData, batch_idx: jax.Array, num_steps: jax.Array, *, dtype,
    preprocess: Preprocess = CIFAR,
):
    """Run the first `num_steps` batches of `batch_idx` [K, B] in one compiled loop.

    A `lax.fori_loop` with a traced trip count (an XLA while loop, like `lax.scan`), so an epoch's shorter
    last chunk reuses the same program. Returns the state and per-step metrics [K] (rows >= num_steps are 0).
    K = 1 compiles the bare step: XLA:CPU runs convolutions inside a while loop several times slower.
    """
    k = batch_idx.shape[0]
    step = lambda state, i: train_step(state, data, i, step_key(state), dtype=dtype, preprocess=preprocess)
    if k == 1:
        state, metrics = step(state, batch_idx[0])
        return state, {name: metrics[name][None] for name in STEP_METRICS}
    buffers = {
        "loss": jnp.zeros(k, jnp.float32),
        "correct": jnp.zeros(k, jnp.int32),
        "penalty": jnp.zeros(k, jnp.float32),
    }

    def body(i, carry):
        state, buffers = carry
        state, metrics = step(state, batch_idx[i])
        buffers = {name: buffers[name].at[i].set(metrics[name]) for name in STEP_METRICS}
        return state, buffers

    return jax.lax.fori_loop(0, num_steps, body, (state, buffers))


@functools.cache
def _eval_batch_fn(apply_fn, preprocess: Preprocess):
    @jax.jit
    def run(variables, images, labels, mask):
        logits = apply_fn(variables, preprocess.eval(images), train=False)
        loss = jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0))
        return loss, jnp.sum(mask & (jnp.argmax(logits, -1) == labels))

    return run


def evaluate(apply_fn, variables: dict, eval_data: EvalData, preprocess: Preprocess = CIFAR) -> dict:
    """Mean loss and top-1 accuracy of `apply_fn(variables, ., train=False)` over a whole split, in float32.

    A model trained with bf16 compute is evaluated in float32 (`float32_apply`): evaluation is a small share
    of the time, and trained, sparse and pruned accuracies are then compared without bf16 rounding (XLA:CPU
    also miscomputes some jitted bf16 eval-mode graphs as NaN). One dispatch per batch, summed on the device
    and read once (XLA:CPU runs convolutions inside a loop program several times slower, so no `lax.scan`)."""
    run = _eval_batch_fn(float32_apply(apply_fn), preprocess)
    loss, correct = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)
    for batch in zip(*eval_data, strict=True):
        batch_loss, batch_correct = run(variables, *batch)
        loss, correct = loss + batch_loss, correct + batch_correct
    n = eval_data.size
    return {"loss": float(loss) / n, "accuracy": float(correct) / n}
