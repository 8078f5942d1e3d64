"""Epoch checkpoints with Orbax, sealed by digests: the last k intact ones kept plus the best, exact restore.

A checkpoint `DIR/<epoch>/` holds three Orbax items: `state` (step, params, batch_stats, opt_state incl. xi,
rng), `meta` (JSON: epoch, phase, the run's config) and `metrics` (JSON: the eval accuracy that ranks "best").
Orbax writes them in the background into a temporary folder and renames it when complete. Then a background
thread seals the checkpoint: `DIR/<epoch>/digests.json` lists the size and SHA-256 of every other file of the
folder, written atomically (temporary file, fsync, rename) once the whole save is on disk.

Restoring checks a checkpoint against its digests before Orbax reads any of it:
- `restore(state)` takes the newest intact checkpoint; each newer one that fails is skipped with a one-line
  warning naming it and its bad file (truncated, changed or missing);
- `restore(state, epoch)` raises CheckpointError naming the bad file.
Every checkpoint this module writes says in its meta that it will be sealed, so one without digests.json was
written by a process killed between the save and the seal: it fails the check. One without that mark predates
digests.json (palm_jax before issue 14): its JSON files are parsed, and it is restored unverified with a note.

Retention: after each seal, the checkpoints older than the `keep` newest intact ones are deleted, except the
intact one with the best eval accuracy. A corrupt or unsealed checkpoint never counts among the `keep`, so
bad newer checkpoints never cost the last good one. Saving an epoch whose folder exists (a corrupt checkpoint
the run went back before) first moves that folder aside to `<epoch>.corrupt`; nothing is overwritten. A
writer removes the temporary folders an interrupted save left behind.
"""

import hashlib
import itertools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from palm_jax.train.state import TrainState

BEST_METRIC = "eval_accuracy"
DIGESTS = "digests.json"
SEALED = "sealed_by"  # meta key set on every checkpoint written here: without DIGESTS it was never sealed
ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax names an unfinished save `<epoch>.orbax-checkpoint-tmp-<time>`
LEGACY_JSON = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")  # parsed when there is no seal


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run (missing, corrupt, other model or optimizer)."""


class _Unreadable(CheckpointError):
    """Orbax failed to read a checkpoint that passed its check (an unverified one, or a bug)."""


class Check(NamedTuple):
    problem: str | None  # what is wrong, naming the file; None when the checkpoint is intact
    sealed: bool  # checked against digests.json (False: written before digests, unverified)


def seal(path: Path) -> None:
    """Write `path/digests.json` atomically: {relative path: [bytes, sha256]} of every other file there."""
    files = {rel: [(path / rel).stat().st_size, _sha256(path / rel)] for rel in _files(path)}
    tmp = path / f"{DIGESTS}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / DIGESTS)
    descriptor = os.open(path, os.O_RDONLY)  # the rename itself on disk
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check(path: Path) -> Check:
    """Whether the checkpoint folder `path` is as it was written: sizes first (a truncated or missing file is
    named as such), then SHA-256 digests. Without digests.json: see the module docstring."""
    if not (path / DIGESTS).exists():
        return _check_unsealed(path)
    try:
        listed = json.loads((path / DIGESTS).read_text())["files"]
        listed = {str(rel): (int(size), str(digest)) for rel, (size, digest) in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Check(f"{DIGESTS} is unreadable ({type(err).__name__})", True)
    for rel, (size, _) in sorted(listed.items()):
        if not (path / rel).is_file():
            return Check(f"{rel} is missing", True)
        actual = (path / rel).stat().st_size
        if actual != size:
            what = "truncated" if actual < size else "longer than written"
            return Check(f"{rel} is {what} ({actual} of {size} bytes)", True)
    for rel, (_, digest) in sorted(listed.items()):
        if _sha256(path / rel) != digest:
            return Check(f"{rel} differs from its SHA-256 digest (changed after it was written)", True)
    return Check(None, True)


def _check_unsealed(path: Path) -> Check:
    meta, problem = _read_json(path, "meta/metadata")
    if problem is None and meta.get(SEALED):
        problem = f"{DIGESTS} is missing (the process stopped after the save, before sealing it)"
    for rel in LEGACY_JSON:
        problem = problem or _read_json(path, rel)[1]
    return Check(problem, False)


class Checkpoints:
    """One checkpoint per epoch under `directory`, keeping the last `keep` intact ones and the best.

    `warn(line)` reports skipped, unverified and moved checkpoints (default: print to stderr).
    """

    def __init__(self, directory: Path, keep: int = 2, *, read_only: bool = False,
                 warn: Callable[[str], None] | None = None):
        self.directory = Path(directory).absolute()
        self.keep, self.read_only = max(keep, 1), read_only
        self._warn = warn or _print_to_stderr
        self._checks: dict[int, Check] = {}  # epoch -> Check, each checkpoint read once per instance
        self._writer = None  # the Orbax AsyncCheckpointer, made at the first save
        self._sealing: threading.Thread | None = None
        self._sealing_error: BaseException | None = None
        self._saves = 0  # names each save's barrier uniquely
        if not read_only and _primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"*{ORBAX_TMP}*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def latest_epoch(self) -> int | None:
        """The newest epoch with a checkpoint folder (intact or not: `restore` decides)."""
        epochs = self.all_epochs()
        return epochs[-1] if epochs else None

    def best_epoch(self) -> int | None:
        """The intact checkpoint with the highest eval accuracy (the latest of equals), None if there is none;
        a better corrupt one is skipped with a warning."""
        self._join()
        return self._best(self._warn)

    def all_epochs(self) -> list[int]:
        """Every epoch with a checkpoint folder, ascending (after the save in progress is on disk)."""
        self._join()
        return self._epochs()

    def save(self, epoch: int, state: TrainState, meta: dict, metrics: dict) -> None:
        """Start writing `state` as epoch `epoch` (in the background; the arrays are copied first); once it is
        on disk it is sealed and the checkpoints no longer kept are deleted."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save epoch {epoch}")
        self._join()
        path = self._path(epoch)
        if path.exists() and _primary():
            self._set_aside(epoch)
        if self._writer is None:
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()  # metrics/metrics, as Orbax's manager
            registry.add("metrics", ocp.args.JsonSave, ocp.JsonCheckpointHandler(filename="metrics"))
            self._writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))
        self._writer.save(
            path,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.checkpoint_tree()),
                meta=ocp.args.JsonSave({"epoch": epoch, **meta, SEALED: DIGESTS}),
                metrics=ocp.args.JsonSave({BEST_METRIC: float(metrics[BEST_METRIC])}),
            ),
        )
        self._saves += 1
        barrier = f"palm_jax_sealed:{self.directory}:{epoch}:{self._saves}"
        # not a daemon thread: a run that ends without close() still seals its last checkpoint
        self._sealing = threading.Thread(target=self._seal_when_written, args=(epoch, barrier))
        self._sealing.start()

    def restore(self, state: TrainState, epoch: int | None = None) -> tuple[TrainState, dict]:
        """`state` with every array taken from the checkpoint of `epoch` (default: the newest intact one,
        newer corrupt ones skipped with a warning), and its meta.

        `state` is the template (a freshly created state of the same model and optimizer): a checkpoint whose
        tree, shapes or dtypes differ raises CheckpointError, as does a corrupt `epoch`.
        """
        self._join()
        template = state.checkpoint_tree()
        epochs = self._epochs()
        if epoch is not None:
            if epoch not in epochs:
                listed = _listed(epochs)
                raise CheckpointError(f"no checkpoint {epoch} in {self.directory} (there are: {listed})")
            problem = self._check(epoch).problem
            if problem:
                others = [e for e in epochs if e != epoch]
                raise CheckpointError(f"checkpoint {self._path(epoch)} is corrupt: {problem}"
                                      + (f"; other checkpoints: {_listed(others)}" if others else ""))
            return self._read(epoch, state, template)
        if not epochs:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for candidate in reversed(epochs):
            problem = self._check(candidate).problem
            if problem is None:
                try:
                    return self._read(candidate, state, template)
                except _Unreadable as err:
                    problem = str(err)
                    self._checks[candidate] = Check(problem, self._check(candidate).sealed)
            self._warn(f"warning: skipping checkpoint {self._path(candidate)}: {problem}")
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} (all {len(epochs)} skipped, see above); "
            "move the folder away to train from the start"
        )

    def wait(self) -> None:
        """Block until every started save is on disk and sealed."""
        self._join()

    def close(self) -> None:
        try:
            self._join()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _path(self, epoch: int) -> Path:
        return self.directory / str(epoch)

    def _epochs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def _check(self, epoch: int) -> Check:
        if epoch not in self._checks:
            self._checks[epoch] = check(self._path(epoch))
        return self._checks[epoch]

    def _read(self, epoch: int, state: TrainState, template: dict) -> tuple[TrainState, dict]:
        path = self._path(epoch)
        if not self._check(epoch).sealed:
            self._warn(f"note: checkpoint {path} has no {DIGESTS} (written by an earlier palm_jax); "
                       "restoring it unverified")
        meta = _read_json(path, "meta/metadata")[0]
        handler = ocp.StandardCheckpointHandler()  # only state/: Orbax reads no other file of the folder
        try:
            _check_fits(path, _orbax(path, lambda: handler.metadata(path / "state")), template)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            restore_args = ocp.args.StandardRestore(abstract)
            tree = _orbax(path, lambda: handler.restore(path / "state", args=restore_args))
        finally:
            handler.close()
        # Orbax returns arrays committed to a device; a fresh state's are uncommitted, and jit compiles the
        # step again for another placement. Uncommitted copies keep a resumed run free of recompilation.
        tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
        meta.pop(SEALED, None)
        return state.from_checkpoint_tree(tree), meta

    def _best(self, warn: Callable[[str], None] | None) -> int | None:
        scored = []
        for epoch in self._epochs():
            metrics, problem = _read_json(self._path(epoch), "metrics/metrics")
            if problem is None and isinstance(metrics.get(BEST_METRIC), int | float):
                scored.append((metrics[BEST_METRIC], epoch))
        for _, epoch in sorted(scored, reverse=True):
            problem = self._check(epoch).problem
            if problem is None:
                return epoch
            if warn is not None:
                warn(f"warning: skipping checkpoint {self._path(epoch)} (best by {BEST_METRIC}): {problem}")
        return None

    def _seal_when_written(self, epoch: int, barrier: str) -> None:
        """Background: wait for Orbax's save, seal it and delete the checkpoints no longer kept (process 0),
        then wait for every process (none reads a checkpoint before it is sealed)."""
        try:
            try:
                self._writer.wait_until_finished()
                if _primary():
                    seal(self._path(epoch))
                    self._checks[epoch] = Check(None, True)
                    self._prune()
            finally:
                ocp.multihost.sync_global_processes(barrier)  # returns at once with one process
        except BaseException as err:  # raised in the caller's thread by the next save / wait / close
            self._sealing_error = err

    def _prune(self) -> None:
        epochs = self._epochs()
        newest_intact = []
        for epoch in reversed(epochs):
            if len(newest_intact) == self.keep:
                break
            if self._check(epoch) == Check(None, True):
                newest_intact.append(epoch)
        if len(newest_intact) < self.keep:
            return
        best = self._best(warn=None)
        for epoch in epochs:
            if epoch < newest_intact[-1] and epoch != best:
                shutil.rmtree(self._path(epoch))
                self._checks.pop(epoch, None)

    def _set_aside(self, epoch: int) -> None:
        path = self._path(epoch)
        target = set_aside(path, "corrupt" if self._check(epoch).problem else "replaced")
        self._checks.pop(epoch, None)
        self._warn(f"note: moved checkpoint {path} to {target.name} before writing epoch {epoch} again")

    def _join(self) -> None:
        if self._sealing is not None:
            self._sealing.join()
            self._sealing = None
        if self._sealing_error is not None:
            error, self._sealing_error = self._sealing_error, None
            raise error


def set_aside(path: Path, kind: str) -> Path:
    """Rename `path` to `<name>.<kind>` (or `<name>.<kind>-<i>`, the first free name); returns the new
    path."""
    names = (f"{path.name}.{kind}" + (f"-{i}" if i else "") for i in itertools.count())
    target = next(path.with_name(name) for name in names if not path.with_name(name).exists())
    path.rename(target)
    return target


def _check_fits(path: Path, metadata, template: dict) -> None:
    """Compare the checkpoint's array metadata with `template` before reading any array."""
    saved = {
        jax.tree_util.keystr(k): (tuple(m.shape), np.dtype(m.dtype))
        for k, m in jax.tree_util.tree_flatten_with_path(metadata)[0]
    }
    wanted = {
        jax.tree_util.keystr(k): (tuple(np.shape(x)), np.dtype(x.dtype))
        for k, x in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    fix = "resume with the options it was written with, or start a new run with another --out"
    for key in sorted(wanted.keys() | saved.keys()):
        if key not in saved or key not in wanted:
            where = "lacks" if key not in saved else "has an extra"
            raise CheckpointError(f"checkpoint {path} does not fit this run: it {where} {key}; {fix}")
        if saved[key] != wanted[key]:
            (shape, dtype), (want_shape, want_dtype) = saved[key], wanted[key]
            raise CheckpointError(
                f"checkpoint {path} does not fit this run: {key} is {shape} {dtype}, this run's is "
                f"{want_shape} {want_dtype}; {fix}"
            )


def _orbax(path: Path, read: Callable):
    try:
        return read()
    except Exception as err:  # Orbax and TensorStore raise many types for unreadable files
        raise _Unreadable(f"cannot read checkpoint {path} ({_short(err)}); it may be corrupt") from err


def _read_json(path: Path, rel: str) -> tuple[dict, str | None]:
    """(the JSON object in `path/rel`, None) or ({}, what is wrong with it)."""
    try:
        value = json.loads((path / rel).read_bytes())
    except FileNotFoundError:
        return {}, f"{rel} is missing"
    except (OSError, ValueError) as err:
        return {}, f"{rel} is not valid JSON ({type(err).__name__})"
    return (value, None) if isinstance(value, dict) else ({}, f"{rel} is not a JSON object")


def _files(path: Path) -> list[str]:
    return sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*")
        if p.is_file() and p.name not in (DIGESTS, f"{DIGESTS}.tmp")
    )


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _short(err: Exception) -> str:
    """The first line of an Orbax / TensorStore error, without TensorStore's `<bound method ...>` details."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    line = lines[0].split(" See full TensorStore details")[0].split("<bound method")[0].strip()
    return f"{type(err).__name__}: {line[:200]}"


def _listed(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) or "none"


def _primary() -> bool:
    return jax.process_index() == 0


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
