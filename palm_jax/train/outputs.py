"""Where the commands may write without destroying anything a user made.

A folder is replaced only when it holds nothing but a palm_jax pruned model (`pruned_model.json`,
`variables/`, and the `prune.json` / `eval.json` the commands write beside them); an absent or empty one is
filled. A run directory, a folder holding one, and the run's own files and folders (its checkpoints, its
`pruned/` model that report.json describes, ...) are never a target of `prune --out`, whatever the options.
`eval` replaces only a file that is an earlier result of `eval`.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from palm_jax.pruning.io import META, VARIABLES, save_pruned
from palm_jax.train.config import ConfigError

PRUNED_ENTRIES = (META, VARIABLES, "prune.json", "eval.json")
# what `train` writes into a run directory (palm_jax/train/experiment.py); checkpoints* too
RUN_ENTRIES = ("config.json", "metrics.jsonl", "tensorboard", "plots", "pruned", "report.json", "report.md",
               "eval.json")


class OutputError(ConfigError):
    """An output folder that would replace something not made by the same command."""


def is_pruned_model(path: Path) -> bool:
    """Whether `path` is a folder holding a pruned model and nothing else (see PRUNED_ENTRIES)."""
    path = Path(path)
    return (path / META).is_file() and all(p.name in PRUNED_ENTRIES for p in path.iterdir())


def is_eval_result(path: Path) -> bool:
    """Whether `path` is a JSON file written by `palm_jax eval` (which replaces only such a file)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and {"checkpoint", "accuracy", "split"} <= value.keys()


def is_empty(path: Path) -> bool:
    return not Path(path).exists() or (Path(path).is_dir() and not any(Path(path).iterdir()))


def check_pruned_out(out: Path, *, replace: bool, run_dir: Path | None = None) -> None:
    """Raise OutputError unless a pruned model may be written to `out`: absent or empty, or a previous pruned
    model when `replace` (CLI: --force). With `run_dir` (the run it is pruned from; paths compared resolved),
    `out` must not be the run, hold it, or be one of its own entries."""
    out = Path(out)
    target = out.resolve()
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if target == run or target in run.parents:
            what = "is the run directory" if target == run else "holds the run directory"
            raise OutputError(f"--out {out} {what} {run_dir}; a run is never replaced by a pruned model: "
                              "choose another --out")
        if run in target.parents:
            inside = target.relative_to(run).parts
            if len(inside) > 1 or inside[0] in RUN_ENTRIES or inside[0].startswith("checkpoints"):
                raise OutputError(f"--out {out} is part of the run {run_dir} ({inside[0]}); choose a new "
                                  "folder, e.g. the default RUN_DIR/pruned-<fold>")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{out} is a file; choose a folder")
    if is_empty(target):
        return
    if not is_pruned_model(target):
        raise OutputError(f"{out} holds other files than a pruned model; palm_jax replaces only a folder "
                          "holding nothing but a pruned model (with or without --force): choose a new or "
                          "empty folder")
    if not replace:
        raise OutputError(f"{out} already holds a pruned model; pass --force to replace it, or choose "
                          "another --out")


def write_pruned(path: Path, result, *, replace: bool = True) -> None:
    """`palm_jax.save_pruned(result)` into a fresh folder beside `path`, then swapped in its place: `path` is
    either the old model or the new one, never half of each. Checked first (`check_pruned_out`)."""
    path = Path(path)
    check_pruned_out(path, replace=replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        save_pruned(fresh, result)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # onto the empty folder just made: a unique name, nothing overwritten
            os.replace(fresh, path)
            shutil.rmtree(old)
        else:
            os.replace(fresh, path)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
