"""The training pipeline end to end on generated data: each method, exact resume, NaN handling."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import LAST_BATCH, STEPS_PER_EPOCH, TF_IMPORTED_BY_TRAINING, scratch_dir, tiny_run

import palm_jax.train
from palm_jax.pruning import load_pruned
from palm_jax.train import Checkpoints, Inputs, TrainConfig, TrainingDiverged, fit, run_experiment
from palm_jax.train.experiment import accuracy_of, load_data, load_trained
from palm_jax.train.loop import steps_per_epoch
from palm_jax.train.metrics import MetricsWriter, read_metrics
from palm_jax.train.state import (
    Apply,
    build_model,
    create_train_state,
    init_variables,
    make_optimizer,
    scale_leaves,
    sparse_params,
)
from palm_jax.train.step import evaluate, to_device, to_eval_batches, train_chunk

REPORT_KEYS = {
    "method",
    "model",
    "dataset",
    "split",
    "epochs",
    "accuracy",
    "channels",
    "params",
    "flops",
    "seconds",
}
RECORD_KEYS = {
    "phase",
    "epoch",
    "step",
    "loss",
    "objective",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "lr",
    "zero_fraction",
    "seconds",
}


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig.load(tiny_run()[0] / "config.json").replace(**changes)


def check_run(run_dir, cfg) -> dict:
    """What every finished run must hold; returns its report."""
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert (report["method"], report["model"], report["dataset"], report["split"]) == (
        cfg.method,
        f"vgg{cfg.depth}",
        "synthetic",
        "val",
    )
    assert set(report["accuracy"]) == {"trained", "sparse", "pruned", "recalibrated", "finetuned"}
    assert (report["accuracy"]["recalibrated"] is None) == (cfg.recalibrate_images == 0)
    assert (report["accuracy"]["sparse"] is None) == (cfg.method != "prox")
    assert (report["accuracy"]["finetuned"] is None) == (cfg.finetune_epochs == 0)
    for what in ("channels", "params", "flops", "flops_ns"):
        assert 0 < report[what]["after"] <= report[what]["before"]
    assert set(report["flops_conventions"]) == {"flops", "flops_ns"}
    # BN statistics re-estimated on whole batches of the training images, never on the eval split
    train_images = len(load_data(cfg).train_labels)
    if cfg.recalibrate_images:
        used = min(cfg.recalibrate_images, train_images) // cfg.batch_size * cfg.batch_size
        assert report["recalibration"]["images"] == used and report["recalibration"]["seconds"] > 0
        assert f"the first {used} training images" in (run_dir / "report.md").read_text()
    # the unpruned and the pruned model timed at batch 1 and the throughput batch
    assert set(report["latency"]["batches"]) == {"1", "64"} and report["latency"]["platform"] == "cpu"
    for row in report["latency"]["batches"].values():
        assert row["before_ms"] > 0 and row["after_ms"] > 0 and row["speedup"] > 0
    assert "| batch | unpruned (ms) | pruned (ms) | speedup |" in (run_dir / "report.md").read_text()
    assert report["seconds"]["total"] >= report["seconds"]["train"] > 0
    assert "| Top-1 accuracy (%, val) |" in (run_dir / "report.md").read_text()
    for name in ("scales", "channels", "curves"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    records = read_metrics(run_dir, "train")
    assert [r["epoch"] for r in records] == list(range(1, cfg.epochs + 1))
    steps = steps_per_epoch(len(load_data(cfg).train_labels), cfg.batch_size)
    assert [r["step"] for r in records] == [steps * e for e in range(1, cfg.epochs + 1)]
    for r in records:
        assert set(r) >= RECORD_KEYS and all(np.isfinite(r[k]) for k in RECORD_KEYS - {"phase"})
    assert records[0]["lr"] == pytest.approx(cfg.lr)
    # every image once per epoch, the last partial batch included
    assert all(float(r["train_accuracy"] * train_images).is_integer() for r in records)
    # the headline is the last epoch; the best epoch is recorded beside it
    assert report["headline"] == "last epoch"
    best = max(records, key=lambda r: r["eval_accuracy"])
    assert report["best_epoch"]["trained"] == {"epoch": best["epoch"], "accuracy": best["eval_accuracy"]}
    assert report["accuracy"]["trained"] == records[-1]["eval_accuracy"]
    assert (report["best_epoch"]["finetuned"] is None) == (cfg.finetune_epoch_count == 0)
    assert "Accuracies are the last epoch's. Best epoch by val" in (run_dir / "report.md").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # the saved pruned model is the one the report measured (fine-tuned when the run fine-tuned, else the
    # recalibrated one when recalibrating)
    assert report["saved_model"] == ("finetuned" if cfg.finetune_epochs else
                                     "recalibrated" if cfg.recalibrate_images else "pruned")
    pruned = load_pruned(run_dir / "pruned")
    data = load_data(cfg)
    acc = accuracy_of(pruned.model, pruned.variables, data.eval_images, data.eval_labels, 500,
                      data.preprocess)
    assert acc == report["accuracy"][report["saved_model"]]
    return report


def test_training_imports_no_tensorflow():
    tiny_run()
    assert not TF_IMPORTED_BY_TRAINING


def test_prox_prunes_exactly_the_zero_xi_channels():
    run_dir, _ = tiny_run()
    cfg = tiny_config()
    report = check_run(run_dir, cfg)
    _, state, epoch = load_trained(run_dir)
    assert epoch == cfg.epochs
    xi = scale_leaves(sparse_params(state, "prox"))
    nonzero = [int(np.count_nonzero(v)) for _, v in xi]
    assert sum(nonzero) < report["channels"]["before"], "the tiny run must zero some xi"
    # VGG: conv i feeds bn i; a channel is kept iff its xi is nonzero (at least one per layer), or it is the
    # layer's carrier of the constants of the removed ones; the pruned logits are the sparse model's
    layers = report["channels_per_layer"]
    assert [r["after"] - r["carriers"] for r in layers] == [max(1, n) for n in nonzero]
    assert all(r["carriers"] <= 1 for r in layers)
    assert report["prune"]["max_logit_deviation"] < 1e-4
    zeros = 1 - sum(nonzero) / sum(v.size for _, v in xi)
    assert read_metrics(run_dir, "train")[-1]["zero_fraction"] == pytest.approx(zeros)
    finetune = read_metrics(run_dir, "finetune")
    assert [r["epoch"] for r in finetune] == [1] and finetune[0]["lr"] == pytest.approx(cfg.finetune_lr)
    # objective = loss + l1 * sum|gamma| (the params' scales, not xi)
    first = read_metrics(run_dir, "train")[0]
    assert first["objective"] > first["loss"]


@pytest.mark.parametrize("method", ["ns", "ista", "baseline"])
def test_other_methods_end_to_end(method):
    cfg = tiny_config(
        synthetic_images=128,  # whole batches: the partial last one is the tiny run's, not compiled again
        method=method,
        epochs=1,
        finetune_epochs=0,
        l1={"ns": 1.5, "ista": 3.0, "baseline": 0.0}[method],
        prune_percent=50.0 if method == "ns" else None,
        recalibrate_images=0 if method == "baseline" else 3000,  # 0: off (3000: all 128 images)
    )
    run_dir = scratch_dir(method) / "run"
    run_experiment(cfg, run_dir, log=lambda *_: None)
    report = check_run(run_dir, cfg)
    record = read_metrics(run_dir, "train")[-1]
    _, state, _ = load_trained(run_dir)
    scales = [np.asarray(v) for _, v in scale_leaves(state.params)]
    zero_fraction = sum(int((v == 0).sum()) for v in scales) / sum(v.size for v in scales)
    assert record["zero_fraction"] == pytest.approx(zero_fraction)
    if method == "ns":  # NS's global rule: half of all channels by |scale|, at least one per layer
        assert report["prune"]["percent"] == 50.0
        assert report["channels"]["after"] <= report["channels"]["before"] // 2 + len(scales)
    if method == "ista":  # soft thresholding leaves exact zeros in the params themselves
        assert zero_fraction > 0
        assert [r["after"] - r["carriers"] for r in report["channels_per_layer"]] == [
            max(1, np.count_nonzero(v)) for v in scales
        ]
    if method == "baseline":
        assert record["objective"] == record["loss"] and zero_fraction == 0
        assert report["channels"]["after"] == report["channels"]["before"]


def assert_same_trees(got, want):
    """Bit-identical on CPU (what resume promises there); within float tolerance on accelerators."""
    flat = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(got), strict=True):
        a, b, where = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(b, a, err_msg=where)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=where)


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_the_uninterrupted_run():
    reference, _ = tiny_run()
    cfg = tiny_config()
    run_dir = scratch_dir("resume") / "run"

    def kill(epoch, step):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_experiment(cfg, run_dir, callback=kill, log=lambda *_: None)
    assert Checkpoints(run_dir / "checkpoints", read_only=True).all_epochs() == [1]
    run_experiment(cfg, run_dir, resume=True, log=lambda *_: None)

    assert LAST_BATCH and cfg.synthetic_images % cfg.batch_size == LAST_BATCH  # epochs end on a partial batch
    for epoch in (1, 2):
        (_, want, _), (_, got, _) = load_trained(reference, epoch), load_trained(run_dir, epoch)
        assert int(got.step) == STEPS_PER_EPOCH * epoch
        assert_same_trees(got.checkpoint_tree(), want.checkpoint_tree())
    assert_same_trees(load_pruned(run_dir / "pruned").variables, load_pruned(reference / "pruned").variables)
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(reference))
    check_run(run_dir, cfg)  # the report of the resumed run, its seconds including the killed run's epoch


def loop_setup(run_dir):
    """The tiny run's model, optimizer and data for calling `fit` directly (its compiled steps are reused)."""
    cfg = tiny_config()
    data = load_data(cfg)
    model = build_model(cfg, data.num_classes)
    variables = init_variables(model, cfg.seed, (32, 32, 3))
    state = create_train_state(model, make_optimizer(cfg, STEPS_PER_EPOCH), variables, cfg.seed)
    inputs = Inputs(to_device(data.train_images, data.train_labels),
                    to_eval_batches(data.eval_images, data.eval_labels, 500), data.preprocess)
    return state, inputs, cfg, Checkpoints(run_dir / "checkpoints"), MetricsWriter(run_dir)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint():
    state, inputs, cfg, checkpoints, metrics = loop_setup(run_dir := scratch_dir("nan"))
    state = fit(state, inputs, cfg.replace(epochs=1), checkpoints, metrics)
    good = jax.device_get(state.checkpoint_tree())
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    poisoned = state.replace(params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params))
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {STEPS_PER_EPOCH + 1} \(epoch 2\)"):
        fit(poisoned, inputs, cfg, checkpoints, metrics, start_epoch=1)
    assert checkpoints.all_epochs() == [1]
    restored, meta = checkpoints.restore(template, 1)
    assert meta["epoch"] == 1
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(restored.checkpoint_tree()), strict=True):
        np.testing.assert_array_equal(np.asarray(b), a)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]


def test_nan_during_fine_tuning_names_the_phase_and_its_lr_option():
    """Issue 14, defect 4: a fine-tuning NaN said "training diverged", "no checkpoint was written yet" (the
    training checkpoints exist) and "try a lower --lr"."""
    state, inputs, cfg, checkpoints, metrics = loop_setup(run_dir := scratch_dir("nan_finetune"))
    state = fit(state, inputs, cfg.replace(epochs=1), checkpoints, metrics)  # a training checkpoint exists
    finetune = cfg.for_phase("finetune")
    copy = lambda: jax.tree.map(jnp.copy, state)  # fit consumes the state it is given
    poisoned = lambda: copy().replace(params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params))
    tuning = Checkpoints(run_dir / "checkpoints_finetune")
    with pytest.raises(TrainingDiverged) as info:
        fit(poisoned(), inputs, finetune, tuning, metrics, phase="finetune")
    assert str(info.value) == (
        "fine-tuning diverged: loss is nan at step 1 (epoch 1); no fine-tuning checkpoint was written yet "
        "(those of the phases before it are kept); try a lower --finetune-lr (a --resume reuses the training "
        "checkpoints)"
    )
    fit(copy(), inputs, finetune.replace(epochs=1), tuning, metrics, phase="finetune")
    with pytest.raises(TrainingDiverged) as info:
        fit(poisoned(), inputs, finetune.replace(epochs=2), tuning, metrics, phase="finetune", start_epoch=1)
    assert str(info.value) == (
        f"fine-tuning diverged: loss is nan at step {STEPS_PER_EPOCH + 1} (epoch 2); the last good "
        f"fine-tuning checkpoint (epoch 1) is in {tuning.directory}; try a lower --finetune-lr (a --resume "
        "reuses the training checkpoints)"
    )
    assert checkpoints.all_epochs() == [1]  # training's, untouched


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    state, inputs, cfg, checkpoints, metrics = loop_setup(scratch_dir("lines"))
    fit(state, inputs, cfg.replace(epochs=1), checkpoints, metrics)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"train: {STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} steps, ETA 0 s, epoch=1, loss=")


def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
    cfg = tiny_config(dtype="bfloat16")
    data = load_data(cfg)
    model = build_model(cfg, data.num_classes)
    state = create_train_state(model, make_optimizer(cfg, 4), init_variables(model, cfg.seed, (32, 32, 3)), 0)
    train = to_device(data.train_images, data.train_labels)
    idx = jnp.arange(2 * cfg.batch_size, dtype=jnp.int32).reshape(2, cfg.batch_size)
    lowered = train_chunk.lower(state, train, idx, jnp.int32(2), dtype=cfg.compute_dtype).as_text()
    assert re.search(r"stablehlo.convolution.*-> tensor<32x32x32x4xbf16>", lowered)  # the first conv, in bf16
    state, metrics = train_chunk(state, train, idx, jnp.int32(2), dtype=cfg.compute_dtype)
    assert np.all(np.isfinite(metrics["loss"]))
    xi = sparse_params(state, "prox")
    for tree in (state.params, state.batch_stats, xi):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype("float32")}


def test_bfloat16_model_is_evaluated_in_float32():
    cfg, state, _ = load_trained(tiny_run()[0])  # trained: logits far from the near-zero ones at init
    data = load_data(cfg)
    bf16_model = build_model(cfg.replace(dtype="bfloat16"), data.num_classes)
    f32_model = build_model(cfg.replace(dtype="float32"), data.num_classes)
    variables = state.variables()
    eval_data = to_eval_batches(data.eval_images, data.eval_labels, 100)
    in_bf16 = evaluate(Apply(bf16_model), variables, eval_data)
    assert in_bf16 == evaluate(Apply(f32_model), variables, eval_data)
    assert np.isfinite(in_bf16["loss"])


def test_bfloat16_run_prunes_and_checks_in_float32():
    cfg = tiny_config(dtype="bfloat16", epochs=1, synthetic_images=128)
    run_dir = scratch_dir("bf16") / "run"
    run_experiment(cfg, run_dir, log=lambda *_: None)
    report = check_run(run_dir, cfg)
    assert report["prune"]["max_logit_deviation"] < 1e-5  # float32 logits: the pruning's deviation alone
    pruned = load_pruned(run_dir / "pruned")
    assert pruned.model.dtype == jnp.float32


def test_many_steps_per_dispatch_equal_one_step_per_dispatch():
    # 5 full steps per epoch in dispatches of up to 3 (chunks of 3 and 2 steps, one compiled loop program),
    # then the last partial batch of 16 images as a step of its own
    cfg = tiny_config(synthetic_images=176, epochs=1)
    data = load_data(cfg)
    model = build_model(cfg, data.num_classes)
    variables = init_variables(model, cfg.seed, (32, 32, 3))
    inputs = Inputs(to_device(data.train_images, data.train_labels),
                    to_eval_batches(data.eval_images, data.eval_labels, 500), data.preprocess)
    results = []
    for per_dispatch in (1, 3):
        state = create_train_state(model, make_optimizer(cfg, 6), variables, cfg.seed)
        run_dir = scratch_dir(f"chunks{per_dispatch}")
        state = fit(state, inputs, cfg.replace(steps_per_dispatch=per_dispatch),
                    Checkpoints(run_dir / "checkpoints"), MetricsWriter(run_dir))
        results.append((jax.device_get(state.checkpoint_tree()), read_metrics(run_dir)[0]))
    (one, one_record), (three, three_record) = results
    assert three_record["step"] == one_record["step"] == 6 and int(one["step"]) == 6
    for key in ("loss", "objective", "train_accuracy", "eval_accuracy", "zero_fraction"):
        assert three_record[key] == pytest.approx(one_record[key], rel=1e-4), key
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(three), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_checkpoints_keep_the_last_k_and_the_best():
    state = loop_setup(run_dir := scratch_dir("keep"))[0]
    checkpoints = Checkpoints(run_dir / "kept", keep=2)
    for epoch, accuracy in enumerate([0.5, 0.9, 0.3, 0.4, 0.2], start=1):
        checkpoints.save(epoch, state.replace(step=jnp.int32(epoch)), {}, {"eval_accuracy": accuracy})
        checkpoints.wait()
    assert checkpoints.all_epochs() == [2, 4, 5] and checkpoints.best_epoch() == 2
    assert sorted(p.name for p in (run_dir / "kept").iterdir()) == ["2", "4", "5"]  # no temporary folders
    restored, meta = Checkpoints(run_dir / "kept", read_only=True).restore(state, 2)
    assert int(restored.step) == 2 and meta["epoch"] == 2


def test_without_matplotlib_the_run_skips_only_the_plots(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a bare accelerator machine
    monkeypatch.setitem(sys.modules, "palm_jax.train.plots", None)
    monkeypatch.delattr(palm_jax.train, "plots", raising=False)  # set once an earlier run imported it
    cfg = tiny_config(method="baseline", epochs=1, finetune_epochs=0, l1=0.0, synthetic_images=128)
    run_dir = scratch_dir("noplots") / "run"
    logged = []
    run_experiment(cfg, run_dir, log=logged.append)
    assert (run_dir / "report.json").exists() and not (run_dir / "plots").exists()
    assert logged[-1].startswith("plots skipped")


def test_finetune_phase_rules():
    cfg = tiny_config(lr=0.1, warmup_epochs=1.0, seed=3, finetune_lr=None, finetune_epochs=None,
                      xi_init="uniform")
    assert cfg.for_phase("train") is cfg
    tune = cfg.for_phase("finetune")
    assert (tune.method, tune.l1, tune.lr, tune.warmup_epochs, tune.seed) == ("baseline", 0.0, 0.1, 0.0, 4)
    assert tune.epochs == cfg.epochs and tune.prune_percent is None and tune.xi_init is None
    tuned = cfg.replace(finetune_epochs=1, finetune_lr=0.01).for_phase("finetune")
    assert (tuned.epochs, tuned.lr) == (1, 0.01)
    with pytest.raises(ValueError, match="phase"):
        cfg.for_phase("pretrain")


def test_recalibrate_images_setting_and_configs_saved_before_it(tmp_path):
    values = tiny_config().to_dict()
    assert values.pop("recalibrate_images") == 3000  # the default: a few thousand training images
    (tmp_path / "config.json").write_text(json.dumps(values))  # a run saved before the setting existed
    assert TrainConfig.load(tmp_path / "config.json").recalibrate_images == 3000
    assert tiny_config(recalibrate_images=0).recalibrate_images == 0
    with pytest.raises(ValueError, match="--recalibrate-images must be an int >= 0"):
        tiny_config(recalibrate_images=-1)


SHARDED = {"widths": (4, 8, 8, 8, 8, 8, 8, 8), "batch_size": 16}


def _sharded_worker(out_path):
    """One epoch of `fit` on 1 device and on a 4-device mesh, for 36 images (a last batch of 4: split) and 38
    (a last batch of 6: replicated); every parameter of each pair saved for the parent to compare."""
    from palm_jax.train import sharding

    assert jax.device_count() == 4
    arrays = {}
    for images in (36, 38):
        cfg = TrainConfig(model="vgg", depth=11, dataset="synthetic", synthetic_images=images, epochs=1,
                          l1=1.5, beta=1.0, **SHARDED)
        data = load_data(cfg)
        model = build_model(cfg, data.num_classes)
        variables = init_variables(model, cfg.seed, (32, 32, 3))
        inputs = Inputs(to_device(data.train_images, data.train_labels),
                        to_eval_batches(data.eval_images, data.eval_labels, 100), data.preprocess)
        for tag, mesh in (("one", None), ("four", sharding.make_mesh())):
            state = create_train_state(model, make_optimizer(cfg, 3), variables, cfg.seed)
            run = inputs
            if mesh is not None:
                state = sharding.replicate(state, mesh)
                run = inputs._replace(train=sharding.replicate(inputs.train, mesh),
                                      eval=sharding.shard_eval(inputs.eval, mesh), mesh=mesh)
            run_dir = scratch_dir(f"sharded{images}{tag}")
            state = fit(state, run, cfg, Checkpoints(run_dir / "checkpoints"), MetricsWriter(run_dir))
            assert int(state.step) == 3
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
                arrays[f"{images}{tag}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(out_path, **arrays)


def test_last_partial_batch_on_a_mesh_equals_one_device(tmp_path):
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out, allow_pickle=False) as f:
        pairs = [(k, f[k], f[k.replace("one", "four", 1)]) for k in f.files if "one" in k]
        assert {k[:2] for k, _, _ in pairs} == {"36", "38"}
        for key, one, four in pairs:
            np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    _sharded_worker(sys.argv[1])
