"""Epoch checkpoints with Orbax: atomic, the last k kept plus the best, exact restore.

A checkpoint `DIR/<epoch>/` holds two items: `state` (step, params, batch_stats, opt_state incl. xi, rng) and
`meta` (JSON: epoch, step, the run's config). Orbax writes each one into a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous checkpoints as they were; leftover temporary
folders are removed when the next manager opens the directory.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from palm_jax.train.state import TrainState

BEST_METRIC = "eval_accuracy"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run (missing, corrupt, other model or optimizer)."""


class Checkpoints:
    """One checkpoint per epoch under `directory`, keeping the last `keep` and the best by eval accuracy."""

    def __init__(self, directory: Path, keep: int = 2, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        preserve = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else preserve,
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def best_epoch(self) -> int | None:
        return self._manager.best_step()

    def all_epochs(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, epoch: int, state: TrainState, meta: dict, metrics: dict) -> None:
        """Start writing `state` as epoch `epoch` (in the background; the arrays are copied first)."""
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.checkpoint_tree()),
                meta=ocp.args.JsonSave({"epoch": epoch, **meta}),
            ),
            metrics={BEST_METRIC: float(metrics[BEST_METRIC])},
        )

    def restore(self, state: TrainState, epoch: int | None = None) -> tuple[TrainState, dict]:
        """`state` with every array taken from the checkpoint of `epoch` (default: the latest), and its meta.

        `state` is the template (a freshly created state of the same model and optimizer): a checkpoint whose
        tree, shapes or dtypes differ raises CheckpointError.
        """
        epoch = self._pick(epoch)
        template = state.checkpoint_tree()
        path = self.directory / str(epoch)
        self._check_fits(epoch, template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # Orbax raises many types for corrupt trees
            raise CheckpointError(
                f"cannot read checkpoint {path} ({_short(err)}); it may be corrupt"
            ) from err
        tree = restored.state
        # Orbax returns arrays committed to a device; a fresh state's are uncommitted, and jit compiles the
        # step again for another placement. Uncommitted copies keep a resumed run free of recompilation.
        tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
        return state.from_checkpoint_tree(tree), dict(restored.meta)

    def _check_fits(self, epoch: int, template: dict) -> None:
        """Compare the checkpoint's array metadata with `template` before reading any array."""
        path = self.directory / str(epoch)
        try:
            metadata = self._manager.item_metadata(epoch)["state"]
            saved = {
                jax.tree_util.keystr(k): (tuple(m.shape), np.dtype(m.dtype))
                for k, m in jax.tree_util.tree_flatten_with_path(metadata)[0]
            }
        except Exception as err:  # Orbax raises many types for unreadable metadata
            raise CheckpointError(
                f"cannot read checkpoint {path} ({_short(err)}); it may be corrupt"
            ) from err
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

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _pick(self, epoch: int | None) -> int:
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None or epoch not in self.all_epochs():
            raise CheckpointError(f"no checkpoint {'' if epoch is None else epoch} in {self.directory}")
        return epoch


def _short(err: Exception) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return f"{type(err).__name__}: {lines[0][:200]}"
