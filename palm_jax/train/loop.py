"""The training loop: epochs of chunks (many steps per dispatch), eval, metrics and a checkpoint per epoch.

    for epoch in start_epoch + 1 .. epochs:
        order = epoch_order(key(rng, epoch))              # data order: a function of (seed, epoch)
        for chunk in order:                               # K steps per dispatch, augmentation (seed, step)
            state, step_metrics = train_chunk(state, data, chunk)
            stop with the step number if a loss is NaN/inf (no checkpoint is written)
        eval; write metrics; save checkpoint (atomically)

Resuming from the checkpoint of epoch e therefore replays epochs e+1.. exactly as an uninterrupted run.
"""

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from palm_jax.data import augment
from palm_jax.train import sharding
from palm_jax.train.checkpoint import Checkpoints
from palm_jax.train.metrics import MetricsWriter
from palm_jax.train.state import TrainState, sparse_params, zero_fraction
from palm_jax.train.step import DeviceData, EvalData, epoch_key, evaluate, train_chunk


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN or infinite; the message names the step."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """What the loop runs: `name` ("train" or "finetune"), the sparsity `method` (for the zero fraction:
    xi for prox) and `l1` (for the objective), `lr_fn` (step -> learning rate), compute `dtype`."""

    name: str
    epochs: int
    batch_size: int
    method: str
    l1: float
    lr_fn: Callable
    dtype: object = jnp.float32
    steps_per_dispatch: int | None = None
    mesh: object = None  # a jax.sharding.Mesh: split every batch over its devices (palm_jax.train.sharding)


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
def epoch_batches(rng: jax.Array, epoch: int, num_examples: int, batch_size: int, rows: int) -> jax.Array:
    """The epoch's data order [rows, batch_size] (rows past the epoch's steps are zeros, never run)."""
    order = augment.epoch_order(epoch_key(rng, epoch), num_examples, batch_size)
    return jnp.concatenate([order, jnp.zeros((rows - order.shape[0], batch_size), order.dtype)])


@functools.partial(jax.jit, static_argnames=("method",))
def epoch_summary(state: TrainState, method: str) -> tuple[jax.Array, jax.Array]:
    """(fraction of BN scales -- xi for prox -- exactly zero, whether every parameter is finite)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)]))
    return zero_fraction(sparse_params(state, method)), finite


def fit(
    state: TrainState,
    data: DeviceData,
    eval_data: EvalData,
    phase: Phase,
    checkpoints: Checkpoints,
    metrics: MetricsWriter,
    *,
    start_epoch: int = 0,
    meta: dict | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> TrainState:
    """Train from the end of `start_epoch` to `phase.epochs`; returns the final state.

    `callback(epoch, step)` runs after every chunk (tests use it to interrupt a run). Raises TrainingDiverged
    with the step number when a loss is not finite; the checkpoints already written stay as they are.
    """
    steps = int(data.labels.shape[0]) // phase.batch_size
    bar = progress_bar(phase.epochs * steps, start_epoch * steps, phase.name)
    try:
        for epoch in range(start_epoch + 1, phase.epochs + 1):
            start = time.perf_counter()
            lr = float(f"{float(phase.lr_fn((epoch - 1) * steps)):.7g}")  # float32 0.1, not 0.10000000149
            state, totals = _train_epoch(state, data, phase, epoch, checkpoints, bar, callback)
            zeros, finite = jax.device_get(epoch_summary(state, phase.method))
            if not finite:
                _diverged("a parameter is not finite", epoch * steps, epoch, checkpoints)
            evaluation = evaluate(state.apply_fn, state.variables(), eval_data)
            record = {
                "phase": phase.name,
                "epoch": epoch,
                "step": epoch * steps,
                "loss": totals["loss"] / steps,
                "objective": totals["objective"] / steps,
                "train_accuracy": totals["correct"] / (steps * phase.batch_size),
                "eval_loss": evaluation["loss"],
                "eval_accuracy": evaluation["accuracy"],
                "lr": lr,
                "zero_fraction": float(zeros),
                "seconds": time.perf_counter() - start,
            }
            checkpoints.save(epoch, state, meta or {}, record)
            metrics.write(record)
            bar.write(
                f"{phase.name} epoch {epoch}/{phase.epochs}: loss {record['loss']:.4f} "
                f"train acc {record['train_accuracy']:.4f} eval acc {record['eval_accuracy']:.4f} "
                f"zeros {record['zero_fraction']:.3f} ({record['seconds']:.1f} s)"
            )
    finally:
        bar.close()
        checkpoints.wait()
    return state


def _train_epoch(state, data, phase: Phase, epoch: int, checkpoints, bar, callback):
    """One epoch in chunks; each chunk's metrics are read after the next chunk is dispatched (the device keeps
    busy). Returns the state and the epoch's summed loss, objective and correct count."""
    num_examples = int(data.labels.shape[0])
    steps = num_examples // phase.batch_size
    num_chunks, chunk = chunk_layout(steps, phase.steps_per_dispatch or default_steps_per_dispatch(steps))
    order = epoch_batches(state.rng, epoch, num_examples, phase.batch_size, num_chunks * chunk)
    if phase.mesh is not None:
        order = sharding.shard_batches(order, phase.mesh)
    totals = {"loss": 0.0, "objective": 0.0, "correct": 0}
    first = (epoch - 1) * steps  # steps done before this epoch
    pending = []
    for c in range(num_chunks + 1):
        if c < num_chunks:
            n = min(chunk, steps - c * chunk)
            rows = order[c * chunk : (c + 1) * chunk]
            state, out = train_chunk(state, data, rows, jnp.int32(n), dtype=phase.dtype)
            pending.append((n, out))
        if len(pending) == 2 or (c == num_chunks and pending):
            n_done, out_done = pending.pop(0)
            _accumulate(totals, jax.device_get(out_done), n_done, first, epoch, phase.l1, checkpoints)
            first += n_done
            done = first - (epoch - 1) * steps
            bar.update(n_done)
            loss, acc = totals["loss"] / done, totals["correct"] / (done * phase.batch_size)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
            if callback is not None:
                callback(epoch, first)
    return state, totals


def _accumulate(totals: dict, out: dict, n: int, first_step: int, epoch: int, l1: float, checkpoints) -> None:
    loss = np.asarray(out["loss"][:n], np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        _diverged(f"loss is {loss[bad[0]]}", first_step + int(bad[0]) + 1, epoch, checkpoints)
    totals["loss"] += float(loss.sum())
    totals["objective"] += float((loss + l1 * np.asarray(out["penalty"][:n], np.float64)).sum())
    totals["correct"] += int(np.asarray(out["correct"][:n]).sum())


def _diverged(what: str, step: int, epoch: int, checkpoints) -> None:
    checkpoints.wait()
    last = checkpoints.latest_epoch()
    kept = (
        f"the last good checkpoint (epoch {last}) is in {checkpoints.directory}"
        if last is not None
        else "no checkpoint was written yet"
    )
    raise TrainingDiverged(
        f"training diverged: {what} at step {step} (epoch {epoch}); {kept}; try a lower --lr or --l1"
    )
