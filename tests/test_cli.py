"""The command line: train's last line, the eval command, one-line errors with exit status 2."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import TINY_ARGS, scratch_dir, tiny_run

from palm_jax import cli, recalibrate_bn
from palm_jax.pruning import load_pruned
from palm_jax.train import TrainConfig
from palm_jax.train.experiment import accuracy_of, load_data

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    """`python -m palm_jax.cli ARGS` in a fresh process: (exit status, stdout, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    env.pop("PALM_JAX_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "palm_jax.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, stderr, *words):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], stderr
    for word in words:
        assert word in lines[0]


def test_train_prints_the_report_path_last():
    run_dir, printed = tiny_run()
    assert printed.strip().splitlines()[-1] == f"report: {run_dir / 'report.json'}"


def test_prune_command_refolds_a_trained_run(capsys):
    run_dir, _ = tiny_run()
    report = json.loads((run_dir / "report.json").read_text())
    results = {}
    for fold in ("exact", "closest", "none"):
        out = scratch_dir(f"reprune_{fold}") / "pruned"
        assert cli.main(["prune", str(run_dir), "--fold", fold, "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"pruned: {out}"
        results[fold] = result = json.loads((out / "prune.json").read_text())
        model, variables, _ = load_pruned(out)
        data = load_data(TrainConfig.load(run_dir / "config.json"))
        accuracy = accuracy_of(model, variables, data.eval_images, data.eval_labels, 100, data.preprocess)
        assert accuracy == result["accuracy"]["recalibrated"]  # the saved model is the recalibrated one
        assert result["latency"]["batches"]["1"]["speedup"] > 0
    # the same pruning as the run's own (before its fine-tuning), and the same sparse model for every fold
    assert results["exact"]["channels"]["after"] == report["channels"]["after"]
    assert results["exact"]["accuracy"]["sparse"] == report["accuracy"]["sparse"]
    assert results["exact"]["accuracy"]["recalibrated"] == report["accuracy"]["recalibrated"]
    assert results["exact"]["max_logit_deviation"] < 1e-4
    assert len({json.dumps(r["accuracy"]["sparse"]) for r in results.values()}) == 1
    assert results["closest"]["carrier_channels"] == results["none"]["carrier_channels"] == 0
    assert results["closest"]["channels"]["after"] == results["none"]["channels"]["after"]
    assert results["closest"]["max_logit_deviation"] <= results["none"]["max_logit_deviation"]


def test_prune_command_recalibrates_only_the_bn_statistics_on_training_images(capsys):
    run_dir, _ = tiny_run()
    cfg = TrainConfig.load(run_dir / "config.json")
    off, on = scratch_dir("recal_off") / "pruned", scratch_dir("recal_on") / "pruned"
    assert cli.main(["prune", str(run_dir), "--recalibrate-images", "0", "--out", str(off)]) == 0
    assert cli.main(["prune", str(run_dir), "--recalibrate-images", "64", "--out", str(on)]) == 0
    capsys.readouterr()
    plain, recalibrated = (json.loads((path / "prune.json").read_text()) for path in (off, on))
    assert plain["recalibration"] is None and plain["accuracy"]["recalibrated"] is None
    assert recalibrated["recalibration"]["images"] == 64 and recalibrated["recalibration"]["batch_size"] == 32
    assert recalibrated["accuracy"]["pruned"] == plain["accuracy"]["pruned"]
    model, before, _ = load_pruned(off)
    _, after, _ = load_pruned(on)
    # bit for bit the same parameters; the statistics are recalibrate_bn's on the first 64 training images of
    # the seeded permutation, normalised as at evaluation (the eval split plays no part)
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
    data = load_data(cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(data.train_labels))[:64]
    want = recalibrate_bn(model, before, data.train_images[order], batch_size=32,
                          preprocess=data.preprocess.eval)
    jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], want["batch_stats"])
    first_mean = lambda variables: jax.tree.leaves(variables["batch_stats"])[0]
    assert not np.array_equal(first_mean(after), first_mean(before))
    bad = scratch_dir("recal_bad") / "pruned"
    assert cli.main(["prune", str(run_dir), "--recalibrate-images", "-1", "--out", str(bad)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--recalibrate-images must be an int >= 0" in error[0]
    # fewer images than a training batch: one batch of them all
    few = scratch_dir("recal_few") / "pruned"
    assert cli.main(["prune", str(run_dir), "--recalibrate-images", "8", "--out", str(few)]) == 0
    assert json.loads((few / "prune.json").read_text())["recalibration"]["batch_size"] == 8


def file_hashes(folder: Path) -> dict:
    """{relative path: SHA-256} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def without_timings(prune_json: str) -> dict:
    """prune.json without what is measured anew each time (latency, the recalibration's seconds)."""
    summary = json.loads(prune_json)
    summary.pop("latency", None)
    if summary.get("recalibration"):
        summary["recalibration"].pop("seconds")
    return summary


def test_prune_out_never_replaces_a_run_or_files_a_user_made(capsys):
    """Issue 14, defect 1: `prune RUN --out RUN` replaced the run by the pruned model, exit status 0."""
    home = scratch_dir("prune_out")
    run_dir = home / "run"
    shutil.copytree(tiny_run()[0], run_dir)
    capsys.readouterr()
    mine = home / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    before = file_hashes(home)
    refused = [
        ([str(run_dir)], "is the run directory"),
        ([str(run_dir) + "/", "--force"], "is the run directory"),  # compared resolved
        ([str(home), "--force"], "holds the run directory"),
        ([str(run_dir / "checkpoints" / "7"), "--force"], "is part of the run"),
        ([str(run_dir / "pruned"), "--force"], "is part of the run"),
        ([str(mine)], "other files than a pruned model"),
        ([str(mine), "--force"], "with or without --force"),
    ]
    for out, words in refused:
        code = cli.main(["prune", str(run_dir), "--out", *out])
        assert code == 2, out
        assert_one_line_error(code, capsys.readouterr().err, words)
    assert cli.main(["eval", str(run_dir), "--out", str(mine / "notes.txt")]) == 2  # eval's --out: a file
    assert_one_line_error(2, capsys.readouterr().err, "is not a result of `eval`")
    assert file_hashes(home) == before  # byte-identical: nothing deleted, nothing written

    # the default folder: written, then kept unless --force (which replaces that pruned model only)
    assert cli.main(["prune", str(run_dir)]) == 0
    default = run_dir / "pruned-exact"
    first = without_timings((default / "prune.json").read_text())
    (default / "prune.json").write_text("{}")  # to tell a replaced model from a kept one
    assert cli.main(["prune", str(run_dir)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "--force")
    assert (default / "prune.json").read_text() == "{}"
    assert cli.main(["prune", str(run_dir), "--force"]) == 0
    assert without_timings((default / "prune.json").read_text()) == first  # the same pruning, written again
    assert sorted(p.name for p in default.iterdir()) == ["prune.json", "pruned_model.json", "variables"]
    assert {k: v for k, v in file_hashes(home).items() if not k.startswith("run/pruned-exact/")} == before


def test_prune_command_needs_a_run_directory(tmp_path):
    code, _, stderr = run_cli("prune", str(tmp_path))
    assert_one_line_error(code, stderr, "not a run directory")


def test_eval_of_a_run_and_of_its_pruned_model(capsys):
    run_dir, _ = tiny_run()
    report = json.loads((run_dir / "report.json").read_text())
    for checkpoint, out, expected in [
        (run_dir, run_dir / "eval.json", report["accuracy"]["trained"]),
        (run_dir / "checkpoints" / "2", run_dir / "eval.json", report["accuracy"]["trained"]),
        (run_dir / "pruned", run_dir / "pruned" / "eval.json", report["accuracy"]["finetuned"]),
    ]:
        assert cli.main(["eval", str(checkpoint)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1] == f"eval: {out}"
        result = json.loads(out.read_text())
        assert result["accuracy"] == expected and result["split"] == "val" and result["images"] == 100
        assert lines[-2].startswith(f"top-1 accuracy: {100 * expected:.2f}% on 100 val images")
    assert json.loads((run_dir / "eval.json").read_text())["accuracy_sparse"] == report["accuracy"]["sparse"]


def test_offline_without_data_is_one_line_naming_data_dir(tmp_path):
    env = {"PALM_JAX_CACHE": str(tmp_path / "cache"), "PALM_JAX_DOWNLOAD": "0"}
    code, _, stderr = run_cli(
        "train", "--dataset", "cifar10", "--epochs", "1", "--out", str(tmp_path / "run"), env=env
    )
    assert_one_line_error(code, stderr, "--data-dir", "DATA_DIR")


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    code, _, stderr = run_cli("train", "--method", "magic", "--out", str(tmp_path / "a"))
    assert_one_line_error(code, stderr, "--method", "prox")
    cases = [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--recipe", "nope"], "demo"),
        (["train", "--prune-percent", "170"], "--prune-percent"),
        (["train", "--model", "resnet", "--depth", "19"], "depth"),
        (["eval", str(tmp_path / "missing")], "does not exist"),
    ]
    for args, word in cases:
        assert cli.main([*args, "--out", str(tmp_path / "b")] if args[0] == "train" else args) == 2, args
        assert_one_line_error(2, capsys.readouterr().err, word)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--epochs", "two"])
    assert exit_info.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "--epochs")


def test_resume_with_other_options_and_foreign_checkpoints_are_one_line(capsys):
    run_dir, _ = tiny_run()
    # a finished run rerun without --resume, or resumed with a different recipe
    assert cli.main(["train", *TINY_ARGS, "--out", str(run_dir)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "--resume")
    assert cli.main(["train", *TINY_ARGS, "--epochs", "3", "--out", str(run_dir), "--resume"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "epochs: saved 2, now 3")
    # a run directory whose checkpoints belong to another model
    foreign = scratch_dir("foreign")
    shutil.copytree(run_dir / "checkpoints", foreign / "checkpoints")
    config = json.loads((run_dir / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "widths": [8] * 8}))
    assert cli.main(["eval", str(foreign)]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "does not fit")


def test_messages_name_only_what_the_user_gave_or_the_recipe_set(tmp_path, monkeypatch, capsys):
    """Issue 14, defect 5: "--train-images (3000)" / "train_images=3000" when the user gave no such option
    (the demo recipe sets it), and a "validation hold-out" when test.npz is the eval split."""
    from test_data import _smooth_images, _write_npz

    monkeypatch.setenv("PALM_JAX_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "run")
    assert cli.main(["train", "--recipe", "demo", "--batch-size", "4000", "--out", out]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "palm_jax train: error: --batch-size 4000 exceeds the recipe's 3,000 training images; set "
        "TRAIN_IMAGES= (or --train-images)"]
    assert cli.main(["train", "--recipe", "demo", "--train-images", "32", "--out", out]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "palm_jax train: error: the recipe's batch size 64 exceeds --train-images 32; set BATCH= (or "
        "--batch-size)"]
    data = tmp_path / "data"
    data.mkdir()
    _write_npz(data / "train.npz", _smooth_images(40, seed=0), np.arange(40) % 10)
    _write_npz(data / "test.npz", _smooth_images(10, seed=1), np.arange(10) % 10)
    demo = ["train", "--recipe", "demo", "--dataset", "cifar10", "--data-dir", str(data), "--out", out]
    assert cli.main(demo) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"palm_jax train: error: the recipe's 3,000 training images asked for, but {data} has 40 training "
        "images; set TRAIN_IMAGES= (or --train-images)")  # test.npz is the eval split: nothing held out
    (data / "test.npz").unlink()  # then the last 5,000 training images are held out: too few here
    assert cli.main(demo) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"palm_jax train: error: {data / 'train.npz'} has 40 images and no test.npz beside it: too few to "
        "hold out the last 5,000 for validation; add a test.npz")
    assert not (tmp_path / "run").exists()  # nothing ran, nothing recorded


def test_recipes_command_lists_and_resolves(capsys):
    from palm_jax.recipes import RECIPES, resolve

    assert cli.main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert listed == list(RECIPES)
    assert cli.main(["recipes", "cifar100-vgg19-ns", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings == json.loads(json.dumps(resolve("cifar100-vgg19-ns", {})[0].to_dict()))
    assert (settings["prune_percent"], settings["finetune_epochs"], settings["method"]) == (50.0, 160, "ns")
    # options given are applied as `train` would apply them; NS fine-tunes as long as it trains
    assert cli.main(["recipes", "cifar10-vgg19-ns", "--json", "--epochs", "3", "--lr-drops", "0.3,0.6",
                     "--momentum", "0.8", "--weight-decay", "5e-4", "--prune-percent", "30"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert (settings["epochs"], settings["finetune_epochs"], settings["lr_drops"]) == (3, 3, [0.3, 0.6])
    assert (settings["momentum"], settings["weight_decay"], settings["prune_percent"]) == (0.8, 5e-4, 30.0)
    assert cli.main(["recipes", "demo", "--json", "--finetune-lr", "none"]) == 0  # 'none' unsets a setting
    assert json.loads(capsys.readouterr().out)["finetune_lr"] is None
    assert cli.main(["recipes", "cifar10-vgg19"]) == 0
    assert "l1: 0.0045" in capsys.readouterr().out.splitlines()
    assert cli.main(["recipes", "nope"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "cifar10-vgg19-fast")


def test_train_help_lists_recipes_and_defaults(capsys):
    from palm_jax.recipes import RECIPES

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f" {name} " in text for name in RECIPES)
    for option, default in (("--momentum", "0.9"), ("--weight-decay", "0.0001"), ("--lr-drops", "0.5,0.75"),
                            ("--epochs", "160"), ("--xi-init", "none")):
        assert re.search(rf"{option} [A-Z_]+ [^\]]*?\(default: {re.escape(default)}[;)]", text), option


def test_default_run_directory_is_tagged_by_the_options_given(tmp_path):
    from palm_jax.recipes import default_run_dir

    data = tmp_path / "cifar10-jpeg"
    given = {"data_dir": str(data) + "/", "epochs": 1, "train_images": 2000, "lr": 0.2}
    assert default_run_dir("cifar10-vgg19", given) == Path("runs/cifar10-vgg19-cifar10-jpeg-e1-n2000")
    assert default_run_dir("demo", {}) == Path("runs/demo")
