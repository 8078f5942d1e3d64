"""One tiny training run shared by test_train, test_cli and test_notebook (made once per pytest process).

A VGG-11 with 4-8 channels per conv on 144 generated 32x32 images, batch 32 (5 steps per epoch: 4 full
batches and a last one of 16 images), 2 epochs of `prox` with an l1 large enough to zero BN scales within
them, then pruning and one fine-tuning epoch. It is made through the CLI, in this process, so that later runs
of the same config reuse its compiled steps.
"""

import atexit
import contextlib
import functools
import io
import shutil
import sys
import tempfile
from pathlib import Path

TINY_ARGS = [
    *("--recipe", "demo", "--widths", "4,8,8,8,8,8,8,8", "--synthetic-images", "144", "--epochs", "2"),
    *("--batch-size", "32", "--l1", "1.5", "--beta", "1", "--finetune-epochs", "1"),
]
STEPS_PER_EPOCH, LAST_BATCH = 5, 16


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"palm_jax_{prefix}_"))
    atexit.register(shutil.rmtree, path, True)
    return path


def tensorflow_modules() -> set[str]:
    return {name for name in sys.modules if name.split(".")[0] in ("tensorflow", "tensorflow_datasets")}


@functools.cache
def tiny_run() -> tuple[Path, str]:
    """(run directory, everything the train command printed on stdout)."""
    from palm_jax import cli

    out = scratch_dir("tiny") / "run"
    printed = io.StringIO()
    before = tensorflow_modules()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["train", *TINY_ARGS, "--out", str(out)])
    assert code == 0, printed.getvalue()
    TF_IMPORTED_BY_TRAINING.update(tensorflow_modules() - before)
    return out, printed.getvalue()


TF_IMPORTED_BY_TRAINING: set[str] = set()
