"""experiments/: every recipe is a valid config; the fast recipe keeps the paper's sparsity fixed points
(checked on a quadratic with SGD momentum + palm_prox); the warm-up schedule; bias_gradients.py."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import tiny_run

from palm_jax import palm_prox
from palm_jax.cli import build_parser, load_recipes, resolve_config
from palm_jax.train import TrainConfig
from palm_jax.train.experiment import load_trained
from palm_jax.train.state import lr_schedule, scale_leaves, sparse_params

RECIPES = load_recipes()
MOMENTUM = 0.9


@pytest.mark.parametrize("name", sorted(RECIPES.RECIPES))
def test_every_recipe_is_a_valid_config(name):
    values, run_name = resolve_config(build_parser().parse_args(["train", "--recipe", name]))
    cfg = TrainConfig(**values)
    assert run_name == name and cfg.epochs > 0


def test_fast_recipe_scales_batch_lr_and_beta_together():
    paper, fast = RECIPES.paper("vgg", 19, "prox"), RECIPES.RECIPES["cifar10-vgg19-fast"]()
    assert (fast["batch_size"], fast["dtype"], fast["epochs"]) == (512, "bfloat16", paper["epochs"])
    assert fast["l1"] == paper["l1"] and fast["lr_drops"] == paper["lr_drops"]
    assert fast["beta"] * fast["lr"] == pytest.approx(paper["beta"] * paper["lr"])
    assert fast["beta"] == pytest.approx(25.0)


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
    path = Path(__file__).resolve().parents[1] / "experiments" / "bias_gradients.py"
    spec = importlib.util.spec_from_file_location("bias_gradients", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir, _ = tiny_run()
    rows = {r["bn"]: r for r in script.bias_gradients(run_dir, images=64)}
    cfg, state, _ = load_trained(run_dir)
    xi = dict(scale_leaves(sparse_params(state, "prox")))
    zeros = {name: int((np.asarray(v) == 0).sum()) for name, v in xi.items()}
    assert {name: r["zero_channels"] for name, r in rows.items()} == {n: z for n, z in zeros.items() if z}
    for name, r in rows.items():
        bias = np.abs(np.asarray(state.params[name]["bias"]))[np.asarray(xi[name]) == 0]
        assert r["decay_zero"] == pytest.approx(cfg.weight_decay * bias.mean())
        assert np.isfinite(r["grad_zero"]) and r["grad_zero"] >= 0
