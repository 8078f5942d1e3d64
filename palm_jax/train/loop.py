"""The training loop: epochs of chunks (many steps per dispatch), eval, metrics and a checkpoint per epoch.

    for epoch in start_epoch + 1 .. epochs:
        full, last = epoch_batches(rng, epoch)            # data order: a function of (seed, epoch)
        for chunk in full, then last (if any):            # K steps per dispatch, augmentation (seed, step)
            state, step_metrics = train_chunk(state, data, chunk)
            stop with the step number if a loss is NaN/inf (no checkpoint is written)
        eval; write metrics; save checkpoint (atomically)

An epoch visits every training image once: its full batches, then the last partial batch (if any) as one
more step of its own shape (PyTorch's DataLoader default, drop_last=False: 782 steps per CIFAR epoch at batch
64). Resuming from the checkpoint of epoch e replays epochs e+1.. exactly as an uninterrupted run.
"""

import functools
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from palm_jax.data import augment
from palm_jax.data.augment import Preprocess
from palm_jax.train import sharding
from palm_jax.train.checkpoint import Checkpoints
from palm_jax.train.config import PHASE_NAMES, PHASES, TrainConfig
from palm_jax.train.metrics import MetricsWriter
from palm_jax.train.state import TrainState, schedule_of, sparse_params, zero_fraction
from palm_jax.train.step import CIFAR, DeviceData, EvalData, epoch_key, evaluate, train_chunk


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN or infinite; the message names the phase, the step, the last
    good checkpoint and the option to change."""


class _NotFinite(Exception):
    """Raised inside an epoch; `fit` turns it into TrainingDiverged with the phase's context."""

    def __init__(self, what: str, step: int):
        super().__init__(what)
        self.what, self.step = what, step


class Inputs(NamedTuple):
    """What a phase trains and evaluates on: the training split and the eval batches on the device, the
    dataset's preprocessing, and the data-parallel mesh (None: one device; see `palm_jax.train.sharding`)."""

    train: DeviceData
    eval: EvalData
    preprocess: Preprocess = CIFAR
    mesh: object = None


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps of one epoch: the full batches and the last partial one (ceil(num_examples / batch_size))."""
    return -(-num_examples // batch_size)


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """1 on CPU (XLA:CPU runs a step inside a loop program several times slower), else up to 100 (launch-bound
    steps)."""
    return 1 if jax.default_backend() == "cpu" else min(100, steps_per_epoch)


def chunk_layout(steps_per_epoch: int, steps_per_dispatch: int) -> tuple[int, int]:
    """(number of chunks, chunk length): the fewest equal-length chunks of at most `steps_per_dispatch` steps;
    the last one runs only the remaining steps (same compiled program, traced trip count)."""
    num_chunks = -(-steps_per_epoch // min(steps_per_dispatch, steps_per_epoch))
    return num_chunks, -(-steps_per_epoch // num_chunks)


def progress_bar(total: int, initial: int, desc: str):
    """tqdm with ETA, loss and accuracy (a terminal redraws each second, a log gets a line every 30 s), or a
    plain line printer where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, initial, desc)
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=interval,
        file=sys.stderr,
    )


class _Lines:
    """The part of tqdm's interface the loop uses: a line with progress and ETA at most every 30 s."""

    def __init__(self, total: int, initial: int, desc: str):
        self.total, self.n, self.desc, self.postfix = total, initial, desc, ""
        self.start, self.first, self.last = time.perf_counter(), initial, 0.0

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= 30 or self.n >= self.total:
            rate = (self.n - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(
                f"{self.desc}: {self.n}/{self.total} steps, ETA {eta:.0f} s, {self.postfix}",
                file=sys.stderr,
                flush=True,
            )
            self.last = now

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size", "rows"))
def epoch_batches(rng: jax.Array, epoch: int, num_examples: int, batch_size: int, rows: int):
    """The epoch's data order: (full batches [rows, batch_size], the rows past them zeros, never run; the last
    partial batch [num_examples % batch_size])."""
    full, last = augment.epoch_batches(epoch_key(rng, epoch), num_examples, batch_size)
    return jnp.concatenate([full, jnp.zeros((rows - full.shape[0], batch_size), full.dtype)]), last


@functools.partial(jax.jit, static_argnames=("method",))
def epoch_summary(state: TrainState, method) -> tuple[jax.Array, jax.Array]:
    """(fraction of BN scales -- xi for prox -- exactly zero, whether every parameter is finite)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)]))
    return zero_fraction(sparse_params(state, method)), finite


def fit(
    state: TrainState,
    inputs: Inputs,
    cfg: TrainConfig,
    checkpoints: Checkpoints,
    metrics: MetricsWriter,
    *,
    phase: str = "train",
    start_epoch: int = 0,
    meta: dict | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> TrainState:
    """Train phase `phase` with `cfg` (the phase's config, `TrainConfig.for_phase`) from the end of
    `start_epoch` to `cfg.epochs`; returns the final state.

    `callback(epoch, step)` runs after every chunk (tests use it to interrupt a run). Raises TrainingDiverged
    with the step number when a loss is not finite; the checkpoints already written stay as they are.
    """
    num_examples = int(inputs.train.labels.shape[0])
    steps = steps_per_epoch(num_examples, cfg.batch_size)
    lr_fn = schedule_of(cfg, steps)
    bar = progress_bar(cfg.epochs * steps, start_epoch * steps, phase)
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            start = time.perf_counter()
            lr = float(f"{float(lr_fn((epoch - 1) * steps)):.7g}")  # float32 0.1, not 0.10000000149
            try:
                state, totals = _train_epoch(state, inputs, cfg, epoch, bar, callback)
                zeros, finite = jax.device_get(epoch_summary(state, cfg.method))
                if not finite:
                    raise _NotFinite("a parameter is not finite", epoch * steps)
            except _NotFinite as err:
                _diverged(err, phase, epoch, cfg, checkpoints)
            evaluation = evaluate(state.apply_fn, state.variables(), inputs.eval, inputs.preprocess)
            record = {
                "phase": phase,
                "epoch": epoch,
                "step": epoch * steps,
                "loss": totals["loss"] / num_examples,
                "objective": totals["objective"] / num_examples,
                "train_accuracy": totals["correct"] / num_examples,
                "eval_loss": evaluation["loss"],
                "eval_accuracy": evaluation["accuracy"],
                "lr": lr,
                "zero_fraction": float(zeros),
                "seconds": time.perf_counter() - start,
            }
            checkpoints.save(epoch, state, meta or {}, record)
            metrics.write(record)
            bar.write(
                f"{phase} epoch {epoch}/{cfg.epochs}: loss {record['loss']:.4f} "
                f"train acc {record['train_accuracy']:.4f} eval acc {record['eval_accuracy']:.4f} "
                f"zeros {record['zero_fraction']:.3f} ({record['seconds']:.1f} s)"
            )
    finally:
        bar.close()
        checkpoints.wait()
    return state


def _dispatches(state, inputs: Inputs, cfg: TrainConfig, epoch: int) -> list[tuple[jax.Array, int, int]]:
    """The epoch's dispatches (batch indices [K, B], steps to run, batch size B): the full batches in chunks
    of at most `steps_per_dispatch` steps, then the last partial batch as one step. With a mesh every batch is
    split over the devices; a last batch that does not split evenly is run whole on every device (replicated:
    the same result as on one device, for one small step per epoch)."""
    num_examples = int(inputs.train.labels.shape[0])
    full, last = divmod(num_examples, cfg.batch_size)
    per_dispatch = cfg.steps_per_dispatch or default_steps_per_dispatch(full)
    num_chunks, chunk = chunk_layout(full, per_dispatch)
    order, rest = epoch_batches(state.rng, epoch, num_examples, cfg.batch_size, num_chunks * chunk)
    rest = rest[None]
    if inputs.mesh is not None:
        order = sharding.shard_batches(order, inputs.mesh)
        if last and last % inputs.mesh.size == 0:
            rest = sharding.shard_batches(rest, inputs.mesh)
        elif last:
            rest = sharding.replicate(rest, inputs.mesh)
    dispatches = [(order[c * chunk : (c + 1) * chunk], min(chunk, full - c * chunk), cfg.batch_size)
                  for c in range(num_chunks)]
    return dispatches + ([(rest, 1, last)] if last else [])


def _train_epoch(state, inputs: Inputs, cfg: TrainConfig, epoch: int, bar, callback):
    """One epoch in dispatches; each one's metrics are read after the next one is dispatched (the device keeps
    busy). Returns the state and the epoch's loss, objective (summed over images) and correct count."""
    steps = steps_per_epoch(int(inputs.train.labels.shape[0]), cfg.batch_size)
    totals = {"loss": 0.0, "objective": 0.0, "correct": 0, "images": 0}
    first = (epoch - 1) * steps  # steps done before this epoch
    pending = []
    dispatches = _dispatches(state, inputs, cfg, epoch)
    for c in range(len(dispatches) + 1):
        if c < len(dispatches):
            rows, n, batch = dispatches[c]
            state, out = train_chunk(state, inputs.train, rows, jnp.int32(n), dtype=cfg.compute_dtype,
                                     preprocess=inputs.preprocess)
            pending.append((n, batch, out))
        if len(pending) == 2 or (c == len(dispatches) and pending):
            n_done, batch, out_done = pending.pop(0)
            _accumulate(totals, jax.device_get(out_done), n_done, batch, first, cfg.l1)
            first += n_done
            bar.update(n_done)
            loss, acc = totals["loss"] / totals["images"], totals["correct"] / totals["images"]
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
            if callback is not None:
                callback(epoch, first)
    return state, totals


def _accumulate(totals: dict, out: dict, n: int, batch: int, first_step: int, l1: float) -> None:
    """Add `n` steps of `batch` images each: per-step mean losses weighted by their batch size."""
    loss = np.asarray(out["loss"][:n], np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        raise _NotFinite(f"loss is {loss[bad[0]]}", first_step + int(bad[0]) + 1)
    totals["loss"] += batch * float(loss.sum())
    totals["objective"] += batch * float((loss + l1 * np.asarray(out["penalty"][:n], np.float64)).sum())
    totals["correct"] += int(np.asarray(out["correct"][:n]).sum())
    totals["images"] += n * batch


# the option that sets each phase's learning rate (TrainConfig.for_phase)
LR_OPTION = {"train": "--lr", "finetune": "--finetune-lr"}


def _diverged(err: _NotFinite, phase: str, epoch: int, cfg: TrainConfig, checkpoints) -> None:
    """Raise TrainingDiverged: what, where (phase, step, epoch), the phase's last good checkpoint, what to
    change (the phase's lr option; --l1 where the phase has a sparsity term)."""
    checkpoints.wait()
    last = checkpoints.latest_epoch()
    name = PHASE_NAMES[phase]
    if last is not None:
        kept = f"the last good {name} checkpoint (epoch {last}) is in {checkpoints.directory}"
    elif phase == PHASES[0]:
        kept = "no checkpoint was written yet"
    else:
        kept = f"no {name} checkpoint was written yet (those of the phases before it are kept)"
    fix = f"a lower {LR_OPTION[phase]}" + (" or --l1" if cfg.method.uses_l1 and cfg.l1 > 0 else "")
    if phase != PHASES[0]:
        fix += " (a --resume reuses the training checkpoints)"
    raise TrainingDiverged(f"{name} diverged: {err.what} at step {err.step} (epoch {epoch}); {kept}; "
                           f"try {fix}") from None
