"""Checkpoint faults: a corrupt newest checkpoint is skipped on resume, named on eval, never costs a good one.

Every fault is made on a copy of the tiny run (tests/train_helpers.py: 2 training epochs, each checkpoint
sealed by digests.json): a truncated or zeroed data file, a missing state/_METADATA, a garbage
_CHECKPOINT_METADATA, and a process killed between Orbax's save and the seal (the folder complete, no
digests.json: what such a kill leaves on disk).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import scratch_dir, tiny_run

from palm_jax.pruning import load_pruned
from palm_jax.train import CheckpointError, Checkpoints, TrainConfig, run_experiment
from palm_jax.train import checkpoint as checkpoint_module
from palm_jax.train.checkpoint import DIGESTS, SEALED, Check, check
from palm_jax.train.experiment import load_trained
from palm_jax.train.metrics import read_metrics


def _data_file(epoch_dir):
    """The largest array data file of an epoch's checkpoint."""
    files = (p for p in (epoch_dir / "state").rglob("*") if p.parent.name == "d")
    return max(files, key=lambda p: p.stat().st_size)


def truncated(epoch_dir):
    file = _data_file(epoch_dir)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


def zeroed(epoch_dir):
    file = _data_file(epoch_dir)
    file.write_bytes(bytes(file.stat().st_size))
    return file


def missing_metadata(epoch_dir):
    (epoch_dir / "state" / "_METADATA").unlink()
    return epoch_dir / "state" / "_METADATA"


def garbage_checkpoint_metadata(epoch_dir):
    (epoch_dir / "_CHECKPOINT_METADATA").write_bytes(b"garbage{{")
    return epoch_dir / "_CHECKPOINT_METADATA"


def killed_before_seal(epoch_dir):
    (epoch_dir / DIGESTS).unlink()
    return epoch_dir / DIGESTS


FAULTS = [truncated, zeroed, missing_metadata, garbage_checkpoint_metadata, killed_before_seal]
WHAT = {truncated: "is truncated", zeroed: "differs from its SHA-256 digest", missing_metadata: "is missing",
        garbage_checkpoint_metadata: "is truncated", killed_before_seal: "is missing"}  # garbage: fewer bytes


def corrupt_copy(fault, name):
    """A copy of the tiny run whose epoch-2 checkpoint has `fault`; (run dir, the bad file relative to it)."""
    run_dir = scratch_dir(name) / "run"
    shutil.copytree(tiny_run()[0], run_dir)
    bad = fault(run_dir / "checkpoints" / "2")
    return run_dir, bad.relative_to(run_dir / "checkpoints" / "2").as_posix()


def assert_same_trees(got, want):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_latest_skips_a_corrupt_checkpoint_and_an_explicit_one_is_refused(fault, caplog):
    run_dir, bad = corrupt_copy(fault, fault.__name__)
    _, want, _ = load_trained(tiny_run()[0], 1)  # the intact epoch 1; also the template of the restore
    warnings = []
    checkpoints = Checkpoints(run_dir / "checkpoints", read_only=True, warn=warnings.append)
    with caplog.at_level(logging.WARNING):
        restored, meta = checkpoints.restore(want)
        assert meta["epoch"] == 1
        assert_same_trees(restored.checkpoint_tree(), want.checkpoint_tree())
        with pytest.raises(CheckpointError) as refused:
            checkpoints.restore(want, 2)
    path = run_dir / "checkpoints" / "2"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"warning: skipping checkpoint {path}: {bad} {WHAT[fault]}")
    assert str(refused.value).startswith(f"checkpoint {path} is corrupt: {bad} {WHAT[fault]}")
    assert str(refused.value).endswith("; other checkpoints: 1") and "\n" not in str(refused.value)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no absl ERROR / WARNING from Orbax


def test_resume_past_a_truncated_checkpoint_equals_the_uninterrupted_run(capfd):
    """Also issue 14, defect 6: the run says where it resumes, the redone training epoch makes the old
    fine-tuning checkpoints stale (set aside, not reused) and metrics.jsonl stays in the order computed."""
    reference = tiny_run()[0]
    run_dir, bad = corrupt_copy(truncated, "resume_truncated")
    truncated_bytes = (run_dir / "checkpoints" / "2" / bad).read_bytes()
    (run_dir / "checkpoints_finetune" / "made_before").write_text("")  # tells the old folder from a new one
    cfg = TrainConfig.load(run_dir / "config.json")
    lines = []
    run_experiment(cfg, run_dir, resume=True, log=lines.append)
    assert [line for line in lines if not line.startswith("data:")] == [
        f"resuming training from epoch 1 of 2 ({run_dir / 'checkpoints' / '1'})",
        "note: training runs again from epoch 2: moved the fine-tuning checkpoints to "
        "checkpoints_finetune.stale",
    ]
    assert not (run_dir / "checkpoints_finetune" / "made_before").exists()
    assert (run_dir / "checkpoints_finetune.stale" / "made_before").exists()

    err = capfd.readouterr().err
    assert f"warning: skipping checkpoint {run_dir / 'checkpoints' / '2'}: {bad} is truncated" in err
    assert "Traceback" not in err
    (_, want, _), (_, got, _) = load_trained(reference, 2), load_trained(run_dir, 2)
    assert_same_trees(got.checkpoint_tree(), want.checkpoint_tree())
    assert_same_trees(load_pruned(run_dir / "pruned").variables, load_pruned(reference / "pruned").variables)
    # the same records in the same order: training 1, 2, fine-tuning 1
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(reference))
    report, want_report = (json.loads((d / "report.json").read_text()) for d in (run_dir, reference))
    timed = ("seconds", "latency", "recalibration")  # measured times (the recalibrated accuracy is compared)
    assert {k: v for k, v in report.items() if k not in timed} == {k: v for k, v in want_report.items()
                                                                     if k not in timed}
    # epoch 2 written again and sealed; the corrupt one moved aside as it was, not deleted
    assert check(run_dir / "checkpoints" / "2") == Check(None, True)
    assert (run_dir / "checkpoints" / "2.corrupt" / bad).read_bytes() == truncated_bytes

    # resuming the finished run: each phase says where it resumes, nothing is redone or set aside
    records, lines = read_metrics(run_dir), []
    run_experiment(cfg, run_dir, resume=True, log=lines.append)
    assert [line for line in lines if not line.startswith("data:")] == [
        f"resuming training from epoch 2 of 2 ({run_dir / 'checkpoints' / '2'})",
        f"resuming fine-tuning from epoch 1 of 1 ({run_dir / 'checkpoints_finetune' / '1'})",
    ]
    assert read_metrics(run_dir) == records
    assert sorted(p.name for p in run_dir.glob("checkpoints*")) == [
        "checkpoints", "checkpoints_finetune", "checkpoints_finetune.stale"]


def test_a_run_that_failed_before_training_can_be_rerun_with_corrected_options(tmp_path, capsys):
    """Issue 14, defect 3: missing data left config.json, and the corrected rerun (make's --resume) was
    refused as "run with other options"; a trailing slash on DATA_DIR was another option too."""
    from palm_jax import cli
    from palm_jax.train.experiment import RunDirError, prepare_run_dir

    out = tmp_path / "run"
    missing = tmp_path / "no-such-data"
    assert cli.main(["train", "--recipe", "demo", "--dataset", "cifar10", "--data-dir", str(missing), "--out",
                     str(out), "--resume"]) == 2
    assert "train.npz does not exist" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    corrected = TrainConfig.load(tiny_run()[0] / "config.json")
    prepare_run_dir(corrected, out, resume=True)  # nothing there binds the corrected run
    # a config.json without checkpoints (left by an earlier palm_jax, or a run stopped before its first
    # checkpoint) binds nothing either
    out.mkdir(exist_ok=True)
    corrected.replace(epochs=7).save(out / "config.json")
    prepare_run_dir(corrected, out, resume=True)

    # with checkpoints the options must match, paths compared resolved
    data = tmp_path / "data"
    run = tmp_path / "started"
    (run / "checkpoints" / "1").mkdir(parents=True)
    corrected.replace(dataset="cifar10", data_dir=str(data) + "/").save(run / "config.json")
    for same in (str(data), str(data) + "/", str(tmp_path / "." / "data")):
        prepare_run_dir(corrected.replace(dataset="cifar10", data_dir=same), run, resume=True)
    with pytest.raises(RunDirError, match="was run with other options .data_dir: saved"):
        prepare_run_dir(corrected.replace(dataset="cifar10", data_dir=str(tmp_path)), run, resume=True)
    with pytest.raises(RunDirError, match="pass --resume"):
        prepare_run_dir(corrected.replace(dataset="cifar10", data_dir=str(data)), run, resume=False)
    # a folder of other files is not a run to write into
    (tmp_path / "notes.txt").write_text("a user's file")
    with pytest.raises(RunDirError, match=r"holds other files than a run \(.*notes.txt"):
        prepare_run_dir(corrected, tmp_path, resume=True)


def test_eval_of_a_corrupt_checkpoint_prints_one_line(tmp_path):
    run_dir, bad = corrupt_copy(zeroed, "eval_cli")
    env = {k: v for k, v in os.environ.items() if k != "PALM_JAX_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "palm_jax.cli", "eval", str(run_dir), "--which", "latest", "--out",
         str(tmp_path / "eval.json")], env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    path = run_dir / "checkpoints" / "2"
    assert proc.stderr.splitlines() == [
        f"palm_jax eval: error: checkpoint {path} is corrupt: {bad} differs from its SHA-256 digest "
        "(changed after it was written); other checkpoints: 1"
    ]  # no traceback, no "Event loop is closed", no absl line


def test_legacy_checkpoint_without_digests_restores_unverified():
    run_dir, _ = corrupt_copy(killed_before_seal, "legacy")
    meta_file = run_dir / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta[SEALED]  # as written before digests existed
    meta_file.write_text(json.dumps(meta))
    _, want, _ = load_trained(tiny_run()[0], 2)
    warnings = []
    restored, meta = Checkpoints(run_dir / "checkpoints", read_only=True, warn=warnings.append).restore(want)
    assert meta["epoch"] == 2
    assert_same_trees(restored.checkpoint_tree(), want.checkpoint_tree())
    assert warnings == [f"note: checkpoint {run_dir / 'checkpoints' / '2'} has no {DIGESTS} (written by an "
                        "earlier palm_jax); restoring it unverified"]


class Killed(Exception):
    pass


def test_retention_never_deletes_the_last_intact_checkpoint(monkeypatch):
    run_dir, bad = corrupt_copy(truncated, "retention")
    directory = run_dir / "checkpoints"
    _, state, _ = load_trained(tiny_run()[0], 1)
    warnings = []
    checkpoints = Checkpoints(directory, keep=1, warn=warnings.append)

    def killed(path):
        raise Killed

    # epoch 1 intact, 2 corrupt, and the process stops after saving 3, before sealing it: with keep=1, a
    # policy counting the newest folders would have deleted 1, the only intact checkpoint
    monkeypatch.setattr(checkpoint_module, "seal", killed)
    checkpoints.save(3, state, {}, {"eval_accuracy": 0.0})
    with pytest.raises(Killed):
        checkpoints.wait()
    monkeypatch.undo()
    assert checkpoints.all_epochs() == [1, 2, 3]
    restored, meta = Checkpoints(directory, read_only=True, warn=warnings.append).restore(state)
    assert meta["epoch"] == 1
    assert len(warnings) == 2
    assert warnings[0] == (f"warning: skipping checkpoint {directory / '3'}: {DIGESTS} is missing "
                           "(the process stopped after the save, before sealing it)")
    assert warnings[1].startswith(f"warning: skipping checkpoint {directory / '2'}: {bad} is truncated")
    # once a newer checkpoint is sealed, the older ones go (keep=1; epoch 4 is also the best)
    checkpoints.save(4, state, {}, {"eval_accuracy": 1.0})
    checkpoints.close()
    assert Checkpoints(directory, read_only=True).all_epochs() == [4]


def test_a_runs_pruned_folder_is_replaced_only_when_it_holds_a_pruned_model(tmp_path):
    """Issue 14, defect 1 (train's side): the run's pruned/ was deleted whatever it held before the new model
    was written."""
    from palm_jax.train.experiment import save_pruned
    from palm_jax.train.outputs import OutputError

    result = load_pruned(tiny_run()[0] / "pruned")
    mine = tmp_path / "pruned"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputError, match="holds other files than a pruned model"):
        save_pruned(mine, result)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary folder left behind

    previous = tmp_path / "previous"
    shutil.copytree(tiny_run()[0] / "pruned", previous)
    (previous / "eval.json").write_text("{}")  # what `eval` writes beside a pruned model
    save_pruned(previous, result)  # a rerun rewrites its own output
    assert not (previous / "eval.json").exists()
    assert_same_trees(load_pruned(previous).variables, result.variables)
    with pytest.raises(OutputError, match="pass --force"):
        save_pruned(previous, result, replace=False)


def test_resume_with_other_fine_tuning_settings_reuses_training_and_redoes_fine_tuning():
    """Issue 14, defect 4's advice: after a fine-tuning divergence, `--resume --finetune-lr LOWER` continues
    from the training checkpoints (it was refused as "run with other options"); the old fine-tuning is set
    aside and done again with the new settings."""
    reference = tiny_run()[0]
    run_dir = scratch_dir("finetune_lr") / "run"
    shutil.copytree(reference, run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    lines = []
    run_experiment(cfg.replace(finetune_lr=cfg.finetune_lr / 2), run_dir, resume=True, log=lines.append)
    assert [line for line in lines if not line.startswith("data:")] == [
        "note: finetune_lr changed: moved the fine-tuning checkpoints to checkpoints_finetune.stale",
        f"resuming training from epoch 2 of 2 ({run_dir / 'checkpoints' / '2'})",
    ]
    old, new = read_metrics(reference), read_metrics(run_dir)
    assert [(r["phase"], r["epoch"]) for r in new] == [("train", 1), ("train", 2), ("finetune", 1)]
    assert new[:2] == old[:2]  # training reused as it was
    assert new[2]["lr"] == old[2]["lr"] / 2 and new[2]["loss"] != old[2]["loss"]
    assert TrainConfig.load(run_dir / "config.json").finetune_lr == cfg.finetune_lr / 2
    # no fine-tuning any more: the last one set aside too, its records dropped
    run_experiment(cfg.replace(finetune_epochs=0), run_dir, resume=True, log=lambda *_: None)
    assert [(r["phase"], r["epoch"]) for r in read_metrics(run_dir)] == [("train", 1), ("train", 2)]
    assert sorted(p.name for p in run_dir.glob("checkpoints*")) == [
        "checkpoints", "checkpoints_finetune.stale", "checkpoints_finetune.stale-1"]
    assert json.loads((run_dir / "report.json").read_text())["accuracy"]["finetuned"] is None
