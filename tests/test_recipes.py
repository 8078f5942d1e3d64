"""palm_jax/recipes.py: every recipe is a valid config, each fidelity fact reads the resolved recipe, the
Makefile's targets are the recipes, the fast recipe keeps the paper's sparsity fixed points (checked on a
quadratic with SGD momentum + palm_prox), the warm-up schedule, experiments/bias_gradients.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_data import _smooth_images, _write_npz
from train_helpers import tiny_run

from palm_jax import palm_prox, recipes
from palm_jax.data import DATASETS, SVHN_MEAN, SVHN_STD
from palm_jax.recipes import RECIPES, resolve
from palm_jax.train import TrainConfig
from palm_jax.train.experiment import load_data, load_trained
from palm_jax.train.loop import steps_per_epoch
from palm_jax.train.state import lr_schedule, make_optimizer, scale_leaves, schedule_of, sparse_params

REPO = Path(__file__).resolve().parents[1]
MOMENTUM = 0.9


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_valid_config(name):
    cfg, run_name = resolve(name, {})
    assert run_name == name and cfg.epochs > 0 and cfg.finetune_epochs is not None
    assert cfg == RECIPES[name].config().replace(finetune_epochs=cfg.finetune_epoch_count)


def test_trainconfig_defaults_are_the_cifar10_vgg19_recipe():
    assert TrainConfig() == resolve("cifar10-vgg19", {})[0] == resolve(None, {})[0]


def test_cifar100_vgg_ns_prunes_half_the_channels_as_network_slimming():
    percent = {name: resolve(name, {})[0].prune_percent for name in RECIPES if name.endswith("-ns")}
    assert percent == {"cifar10-vgg19-ns": 70.0, "cifar100-vgg19-ns": 50.0}
    for dataset in ("cifar10", "cifar100"):  # NS README: ResNet-164 and DenseNet-40 prune 40% on both
        for model in ("resnet", "densenet"):
            assert (
                resolve(None, {"dataset": dataset, "model": model, "method": "ns"})[0].prune_percent == 40.0
            )
    cfg = resolve("cifar100-vgg19-ns", {})[0]
    assert (cfg.l1, cfg.finetune_epochs, cfg.epochs) == (1e-4, 160, 160)


def test_cifar100_reuses_cifar10_l1_and_beta_and_says_so():
    for model in ("vgg19", "resnet164", "densenet40"):
        ten, hundred = resolve(f"cifar10-{model}", {})[0], resolve(f"cifar100-{model}", {})[0]
        assert (hundred.l1, hundred.beta) == (ten.l1, ten.beta) == recipes.PROX[ten.model]
        assert hundred.dataset == "cifar100" and "CIFAR-10's" in RECIPES[f"cifar100-{model}"].summary


def test_svhn_trains_on_train_and_extra_without_crop_or_flip_and_is_tested_on_test(tmp_path, monkeypatch):
    monkeypatch.setenv("PALM_JAX_CACHE", str(tmp_path / "cache"))
    for split, count, seed in (("train", 12, 0), ("extra", 8, 1), ("test", 5, 2)):
        _write_npz(tmp_path / f"{split}.npz", _smooth_images(count, seed), np.arange(count) % 10)
    cfg = resolve(None, {"dataset": "svhn", "data_dir": str(tmp_path)})[0]
    data = load_data(cfg)
    assert (len(data.train_labels), data.train_splits, data.eval_split, len(data.eval_labels)) == (
        20,
        ("train", "extra"),
        "test",
        5,
    )
    np.testing.assert_array_equal(data.train_labels, np.r_[np.arange(12) % 10, np.arange(8) % 10])
    assert data.preprocess == DATASETS["svhn"].preprocess
    assert (data.preprocess.crop_flip, data.preprocess.mean, data.preprocess.std) == (
        False,
        SVHN_MEAN,
        SVHN_STD,
    )
    (tmp_path / "extra.npz").unlink()  # without extra.npz: the train split alone, and the dataset says so
    assert load_data(cfg).train_splits == ("train",)
    assert DATASETS["cifar100"].preprocess == DATASETS["cifar10"].preprocess  # CIFAR-10's stats, crop + flip
    assert DATASETS["cifar10"].preprocess.crop_flip and DATASETS["cifar10"].train_splits == ("train",)


def test_an_epoch_keeps_the_last_partial_batch_782_steps_on_cifar():
    cfg = resolve("cifar10-vgg19", {})[0]
    steps = steps_per_epoch(50_000, cfg.batch_size)
    assert steps == 782  # 781 batches of 64 and one of 16, as PyTorch's DataLoader (drop_last=False)
    schedule = schedule_of(cfg, steps)  # lr / 10 after 80 and 120 epochs, as int(0.5 * 160) in the originals
    got = [float(schedule(s)) for s in (80 * steps - 1, 80 * steps, 120 * steps - 1, 120 * steps)]
    np.testing.assert_allclose(got, [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize("xi_init", [None, "uniform"])
def test_xi_init_option_reaches_the_optimizer(xi_init):
    cfg = resolve("demo", {"widths": (4,) * 8} | ({"xi_init": xi_init} if xi_init else {}))[0]
    params = {"bn": {"scale": jnp.full(64, 0.5)}}
    xi = np.asarray(make_optimizer(cfg, 10).init(params)[-1].xi["bn"]["scale"])
    if xi_init is None:
        np.testing.assert_array_equal(xi, 0.5)
    else:
        assert xi.min() >= 0.47 and xi.max() < 0.53 and len(np.unique(xi)) > 32


def test_makefile_targets_are_the_recipes():
    names = list(RECIPES)
    out = (
        subprocess.run(
            ["make", "-n", "-s", f"PYTHON={sys.executable}", *names],
            cwd=REPO,
            text=True,
            capture_output=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert len(out) == len(names)
    for name, line in zip(names, out, strict=True):
        assert f"-m palm_jax.cli train --recipe {name} " in line and "--resume" in line
    listed = subprocess.run(
        [sys.executable, "-S", "-m", "palm_jax.recipes"], cwd=REPO, text=True, capture_output=True, check=True
    ).stdout.split()
    assert listed == names  # read without site-packages: no JAX needed


def test_fast_recipe_scales_batch_lr_and_beta_together():
    paper, fast = resolve("cifar10-vgg19", {})[0], resolve("cifar10-vgg19-fast", {})[0]
    assert (fast.batch_size, fast.dtype, fast.epochs) == (512, "bfloat16", paper.epochs)
    assert fast.l1 == paper.l1 and fast.lr_drops == paper.lr_drops
    assert fast.beta * fast.lr == pytest.approx(paper.beta * paper.lr)
    assert fast.beta == pytest.approx(25.0)


def run_to_fixed_point(targets, l1, beta, lr, steps):
    """Minimise f(gamma) = |gamma - targets|^2 / 2 with SGD (momentum 0.9) + palm_prox, float64."""
    tx = optax.chain(optax.sgd(lr, momentum=MOMENTUM), palm_prox(l1, beta, learning_rate=lr))
    params = {"bn": {"scale": jnp.full(targets.shape, 0.5)}}
    state = tx.init(params)

    def step(carry, _):
        params, state = carry
        grads = {"bn": {"scale": params["bn"]["scale"] - targets}}
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), None, length=steps)
    return np.asarray(params["bn"]["scale"]), np.asarray(state[1].xi["bn"]["scale"])


def test_fixed_points_depend_on_l1_not_on_lr_or_beta():
    # By hand, for f = (gamma - t)^2 / 2 (gradient gamma - t): a channel with |t| > (1 - mu) l1 settles at
    # gamma = t - (1 - mu) l1 sign(t), xi = gamma - l1 sign(t) / beta; one with |t| <= (1 - mu) l1 at
    # xi = 0 exactly, gamma = t / (beta (1 - mu) + 1).
    with jax.enable_x64(True):
        targets = jnp.asarray([0.02, -0.03, 0.049, 0.2, -0.5], jnp.float64)
        l1 = 0.5  # (1 - mu) * l1 = 0.05
        t = np.asarray(targets)
        alive = np.abs(t) > (1 - MOMENTUM) * l1
        for lr, beta in ((0.1, 100.0), (0.4, 25.0)):  # the paper's and the fast recipe's lr and beta
            gamma, xi = run_to_fixed_point(targets, l1, beta, lr, steps=4000)
            settled = t - (1 - MOMENTUM) * l1 * np.sign(t)
            expected_gamma = np.where(alive, settled, t / (beta * (1 - MOMENTUM) + 1))
            expected_xi = np.where(alive, expected_gamma - l1 * np.sign(t) / beta, 0.0)
            np.testing.assert_allclose(gamma, expected_gamma, atol=1e-9)
            np.testing.assert_allclose(xi, expected_xi, atol=1e-9)
            assert np.all((xi == 0) == ~alive)


def test_warmup_reaches_lr_linearly_then_drops():
    schedule = lr_schedule(0.4, total_steps=100, drops=(0.5, 0.75), warmup_steps=10)
    got = [float(schedule(s)) for s in (0, 4, 9, 10, 49, 50, 75)]
    np.testing.assert_allclose(got, [0.04, 0.2, 0.4, 0.4, 0.4, 0.04, 0.004], rtol=1e-6)
    assert float(lr_schedule(0.4, 100)(0)) == pytest.approx(0.4)  # no warm-up by default


def test_warmup_epochs_must_be_finite_and_not_negative():
    with pytest.raises(ValueError, match="--warmup-epochs"):
        TrainConfig(warmup_epochs=-1)


def test_bias_gradients_of_a_prox_run():
    path = REPO / "experiments" / "bias_gradients.py"
    spec = importlib.util.spec_from_file_location("bias_gradients", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir, _ = tiny_run()
    rows = {r["bn"]: r for r in script.bias_gradients(run_dir, images=64)}
    cfg, state, _ = load_trained(run_dir)
    xi = dict(scale_leaves(sparse_params(state, cfg.method)))
    zeros = {name: int((np.asarray(v) == 0).sum()) for name, v in xi.items()}
    assert {name: r["zero_channels"] for name, r in rows.items()} == {n: z for n, z in zeros.items() if z}
    for name, r in rows.items():
        bias = np.abs(np.asarray(state.params[name]["bias"]))[np.asarray(xi[name]) == 0]
        assert r["decay_zero"] == pytest.approx(cfg.weight_decay * bias.mean())
        assert np.isfinite(r["grad_zero"]) and r["grad_zero"] >= 0
