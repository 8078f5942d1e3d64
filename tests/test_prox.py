"""The proximal transforms against hand-computed values and the authors' loop, and inside optax and Flax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import palm_jax
from palm_jax.prox import PalmProxState

LR = optax.piecewise_constant_schedule(0.1, {1: 0.5})  # 0.1 at the first update, 0.05 after


def tree():
    """A BatchNorm scale, and two leaves that no default mask selects."""
    return {"bn": {"scale": jnp.array([0.5, 0.02, -0.3, -0.01]), "bias": jnp.array([0.1, -0.2, 0.3, 0.4])},
            "kernel": jnp.array([[1.0, -2.0, 3.0, 4.0]])}


def incoming():
    return {"bn": {"scale": jnp.array([-0.1, 0.0, 0.1, 0.0]), "bias": jnp.array([1e-3, -7.0, 0.123, 0.5])},
            "kernel": jnp.array([[0.25, -0.5, 1.5, -1.0]])}


def run(tx, params, updates_seq, jit=True):
    """Apply ``tx`` to each incoming update in turn; returns params and state."""
    state = jax.jit(tx.init)(params) if jit else tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for updates in updates_seq:
        updates, state = update(updates, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def bits(x):
    return np.asarray(x).view(np.uint32)


def assert_positive_zeros(x):
    x = np.asarray(x)
    assert np.all(np.signbit(x[x == 0]) == 0), f"negative zeros in {x}"


# ---------------------------------------------------------------- hand-computed single steps


def test_palm_prox_two_steps_by_hand():
    tx = palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=LR)
    params, state = run(tx, tree(), [incoming()])
    # a = 10, beta = 10, g = p + u = [0.4, 0.02, -0.2, -0.01], xi = p = [0.5, 0.02, -0.3, -0.01]
    # gamma = (10 g + 10 xi) / 20 = [0.45, 0.02, -0.25, -0.01]
    # xi = S_{1/20}((10 xi + 10 gamma) / 20) = S_0.05([0.475, 0.02, -0.275, -0.01]) = [0.425, 0, -0.225, 0]
    np.testing.assert_allclose(params["bn"]["scale"], [0.45, 0.02, -0.25, -0.01], rtol=1e-6)
    np.testing.assert_allclose(state.xi["bn"]["scale"], [0.425, 0.0, -0.225, 0.0], rtol=1e-6)
    assert_positive_zeros(state.xi["bn"]["scale"])
    assert state.count == 1

    zero = jax.tree.map(jnp.zeros_like, tree())
    updates, state = tx.update(zero, state, params)
    # count 1: lr = 0.05, a = 20, g = [0.45, 0.02, -0.25, -0.01], xi = [0.425, 0, -0.225, 0]
    # gamma = (20 g + 10 xi) / 30 = [1.325, 0.04, -0.725, -0.02] / 3
    # xi = S_{1/30}((20 xi + 10 gamma) / 30)
    #    = S_{0.1/3}([0.85 + 1.325/3, 0.04/3, -0.45 - 0.725/3, -0.02/3] / 3)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["bn"]["scale"],
                               [1.325 / 3, 0.04 / 3, -0.725 / 3, -0.02 / 3], rtol=1e-6)
    np.testing.assert_allclose(state.xi["bn"]["scale"], [(0.85 + 1.325 / 3 - 0.1) / 3, 0.0,
                                                         (-0.45 - 0.725 / 3 + 0.1) / 3, 0.0], rtol=1e-6)
    assert state.xi["bn"]["scale"][1] == 0.0 and state.xi["bn"]["scale"][3] == 0.0
    assert_positive_zeros(state.xi["bn"]["scale"])


def test_soft_threshold_one_step_by_hand():
    tx = palm_jax.soft_threshold(l1=1.0, learning_rate=LR)
    params, state = run(tx, tree(), [incoming()])
    # S_{0.1 * 1}([0.4, 0.02, -0.2, -0.01]) = [0.3, 0, -0.1, 0]
    np.testing.assert_allclose(params["bn"]["scale"], [0.3, 0.0, -0.1, 0.0], rtol=1e-6)
    assert params["bn"]["scale"][1] == 0.0 and params["bn"]["scale"][3] == 0.0
    assert_positive_zeros(params["bn"]["scale"])
    assert state.count == 1


def test_l1_subgradient_one_step_by_hand():
    tx = palm_jax.l1_subgradient(l1=0.01)
    params = {"bn": {"scale": jnp.array([0.5, 0.0, -2.0])}, "kernel": jnp.ones((2, 2))}
    grads = {"bn": {"scale": jnp.array([0.1, 0.2, -0.3])}, "kernel": jnp.full((2, 2), 0.7)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bn"]["scale"], [0.11, 0.2, -0.31], rtol=1e-6)  # sign(0) = 0
    np.testing.assert_array_equal(bits(updates["kernel"]), bits(grads["kernel"]))


def test_l1_penalty_by_hand():
    assert palm_jax.l1_penalty(tree()) == pytest.approx(0.5 + 0.02 + 0.3 + 0.01)
    assert palm_jax.l1_penalty(tree(), {"bn": False, "kernel": True}) == pytest.approx(10.0)


# ---------------------------------------------------------------- the authors' loop, step by step


def authors_loop(params, batches, lr_at, l1, beta, momentum=0.9, weight_decay=1e-4):
    """NumPy float64 transcription of the authors' main.py: torch SGD, then update_scaling_factor."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    xi = p["scale"].copy()
    for step, (x, t) in enumerate(batches):
        h = x @ p["kernel"]
        r = (h * p["scale"] + p["bias"] - t) / len(x)  # d loss / d y for loss = sum((y - t)^2) / (2 N)
        grads = {"kernel": x.T @ (r * p["scale"]), "scale": (h * r).sum(0), "bias": r.sum(0)}
        lr = lr_at(step)
        for k in p:  # torch.optim.SGD(momentum, weight_decay)
            buf[k] = momentum * buf[k] + grads[k] + weight_decay * p[k]
            p[k] = p[k] - lr * buf[k]
        alpha = 1.0 / lr
        p["scale"] = (alpha * p["scale"] + beta * xi) / (alpha + beta)
        v = (alpha * xi + beta * p["scale"]) / (alpha + beta)
        xi = np.sign(v) * np.maximum(np.abs(v) - l1 / (alpha + beta), 0.0)  # torch.nn.Softshrink
    return p, xi


def test_matches_authors_loop_over_two_lr_drops_in_float64():
    steps, drops, l1, beta = 30, (10, 20), 0.5, 10.0
    rng = np.random.default_rng(0)
    init = {"kernel": rng.normal(size=(3, 4)), "scale": np.array([1.0, 0.3, -0.05, 0.02]),
            "bias": np.zeros(4)}
    target = rng.normal(size=(3, 4)) * np.array([1.0, 0.5, 0.0, 0.0])
    xs = [rng.normal(size=(8, 3)) for _ in range(steps)]
    batches = [(x, x @ target) for x in xs]
    expected, expected_xi = authors_loop(init, batches, lambda k: 0.1 * 0.1 ** sum(k >= d for d in drops),
                                         l1, beta)

    with jax.enable_x64(True):
        lr = optax.piecewise_constant_schedule(0.1, {d: 0.1 for d in drops})
        tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9),
                         palm_jax.palm_prox(l1=l1, beta=beta, learning_rate=lr))

        def loss(p, x, t):
            return 0.5 * jnp.sum((x @ p["kernel"] * p["scale"] + p["bias"] - t) ** 2) / len(x)

        @jax.jit
        def step(params, state, x, t):
            updates, state = tx.update(jax.grad(loss)(params, x, t), state, params)
            return optax.apply_updates(params, updates), state

        params = {k: jnp.asarray(v) for k, v in init.items()}
        state = tx.init(params)
        for x, t in batches:
            params, state = step(params, state, x, t)
        xi = palm_jax.sparse_scales(params, state)["scale"]
        assert xi.dtype == jnp.float64 and state[2].count == steps == state[1][1].count

    for k in expected:
        np.testing.assert_allclose(params[k], expected[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(xi, expected_xi, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(xi) == 0, expected_xi == 0)
    assert 0 < np.sum(expected_xi == 0) < 4  # the run does zero some scales, and not all
    assert_positive_zeros(xi)


# ---------------------------------------------------------------- pass-through, dtypes, jit


def test_unselected_leaves_pass_through_bit_for_bit_and_hold_no_state():
    tx = palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=0.1)
    state = tx.init(tree())
    assert isinstance(state.xi["kernel"], optax.MaskedNode)
    assert isinstance(state.xi["bn"]["bias"], optax.MaskedNode)
    assert len(jax.tree.leaves(state.xi)) == 1
    for transform in (tx, palm_jax.soft_threshold(1.0, 0.1), palm_jax.l1_subgradient(1.0)):
        updates, _ = jax.jit(transform.update)(incoming(), transform.init(tree()), tree())
        np.testing.assert_array_equal(bits(updates["kernel"]), bits(incoming()["kernel"]))
        np.testing.assert_array_equal(bits(updates["bn"]["bias"]), bits(incoming()["bn"]["bias"]))


def test_bfloat16_params_keep_their_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree())
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=0.1))
    state = tx.init(params)
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), incoming())
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert state[1].xi["bn"]["scale"].dtype == jnp.bfloat16
    for transform in (palm_jax.soft_threshold(1.0, 0.1), palm_jax.l1_subgradient(1.0)):
        updates, _ = transform.update(params, transform.init(params), params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("make", [
    lambda: palm_jax.palm_prox(l1=0.5, beta=10.0, learning_rate=LR),
    lambda: palm_jax.soft_threshold(l1=0.5, learning_rate=LR),
])
def test_jit_and_no_jit_agree(make):
    tx = optax.chain(optax.sgd(LR, momentum=0.9), make())
    seq = [incoming(), tree(), incoming()]
    eager, eager_state = run(tx, tree(), seq, jit=False)
    jitted, jitted_state = run(tx, tree(), seq, jit=True)
    pairs = zip(jax.tree.leaves((eager, eager_state)), jax.tree.leaves((jitted, jitted_state)), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


# ---------------------------------------------------------------- composition with optax and Flax


def test_inject_hyperparams_changes_l1_and_beta_at_run_time():
    tx = optax.chain(optax.sgd(LR, momentum=0.9),
                     optax.inject_hyperparams(palm_jax.palm_prox)(l1=0.01, beta=10.0, learning_rate=LR))
    update = jax.jit(tx.update)
    params, state = tree(), tx.init(tree())
    updates, state = update(incoming(), state, params)
    params = optax.apply_updates(params, updates)
    assert float(state[1].hyperparams["learning_rate"]) == pytest.approx(0.1)  # used by the first update
    state[1].hyperparams["l1"] = jnp.asarray(2.0)
    state[1].hyperparams["beta"] = jnp.asarray(3.0)

    got, got_state = update(incoming(), state, params)
    sgd_updates, _ = optax.sgd(LR, momentum=0.9).update(incoming(), state[0], params)
    fixed = palm_jax.palm_prox(l1=2.0, beta=3.0, learning_rate=0.05)
    want, want_state = fixed.update(sgd_updates, state[1].inner_state, params)
    np.testing.assert_allclose(got["bn"]["scale"], want["bn"]["scale"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_state[1].inner_state.xi["bn"]["scale"], want_state.xi["bn"]["scale"],
                               rtol=1e-6)
    assert np.any(np.asarray(want_state.xi["bn"]["scale"]) == 0)  # l1 = 2 is felt
    np.testing.assert_allclose(palm_jax.sparse_scales(params, got_state)["bn"]["scale"],
                               want_state.xi["bn"]["scale"], rtol=1e-6)


def test_inject_hyperparams_with_a_callable_mask_as_static_arg():
    mask = lambda path, leaf: leaf.ndim == 2
    tx = optax.inject_hyperparams(palm_jax.palm_prox, static_args="mask")(l1=0.1, beta=1.0, learning_rate=0.1,
                                                                         mask=mask)
    _, state = run(tx, tree(), [incoming()])
    assert palm_jax.sparse_scales(tree(), state)["kernel"].shape == (1, 4)
    assert isinstance(state.inner_state.xi["bn"]["scale"], optax.MaskedNode)


def test_multisteps_applies_palm_once_per_accumulated_step():
    chain = optax.chain(optax.sgd(LR, momentum=0.9), palm_jax.palm_prox(l1=0.5, beta=10.0, learning_rate=LR))
    grads = [incoming(), tree(), jax.tree.map(lambda x: -x, incoming()), tree()]
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    want, want_state = run(chain, tree(), means)
    got, got_state = run(optax.MultiSteps(chain, every_k_schedule=2), tree(), grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    assert got_state.inner_opt_state[1].count == 2
    np.testing.assert_allclose(palm_jax.sparse_scales(got, got_state)["bn"]["scale"],
                               want_state[1].xi["bn"]["scale"], rtol=1e-6)


def test_sparse_scales_finds_the_state_inside_masked():
    tx = optax.masked(palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=0.1), {"bn": True, "kernel": False})
    params, state = run(tx, tree(), [incoming()])
    sparse = palm_jax.sparse_scales(params, state)
    np.testing.assert_allclose(sparse["bn"]["scale"], [0.425, 0.0, -0.225, 0.0], rtol=1e-6)
    assert sparse["kernel"] is params["kernel"] and sparse["bn"]["bias"] is params["bn"]["bias"]


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x)).sum()


def test_train_state_apply_gradients():
    model = LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((4, 3)))
    tx = optax.chain(optax.sgd(LR, momentum=0.9), palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=LR))
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 new.params, optax.apply_updates(state.params, updates))
    sparse = palm_jax.sparse_scales(new.params, new.opt_state)
    want_xi = opt_state[1].xi["BatchNorm_0"]["scale"]
    np.testing.assert_allclose(sparse["BatchNorm_0"]["scale"], want_xi, rtol=1e-6)
    assert new.step == 1 and new.opt_state[1].count == 1


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_nnx_optimizer_with_batchnorm():
    model = NnxNet(nnx.Rngs(0))
    tx = optax.chain(optax.sgd(LR, momentum=0.9), palm_jax.palm_prox(l1=1.0, beta=10.0, learning_rate=LR))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    loss = lambda m: jnp.sum((m(x) - 1.0) ** 2)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    want_state = tx.init(params)
    for _ in range(2):
        grads = nnx.as_pure(nnx.state(nnx.grad(loss)(model), nnx.Param))
        updates, want_state = tx.update(grads, want_state, params)
        params = optax.apply_updates(params, updates)
        step(model, optimizer)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)
    for state_params in (nnx.state(model, nnx.Param), got):
        sparse = palm_jax.sparse_scales(state_params, optimizer.opt_state)
        want_xi = want_state[1].xi["bn"]["scale"]
        np.testing.assert_allclose(nnx.as_pure(sparse)["bn"]["scale"], want_xi, rtol=1e-5)
        np.testing.assert_array_equal(nnx.as_pure(sparse)["linear"]["kernel"], got["linear"]["kernel"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, name", [
    (lambda: palm_jax.palm_prox(l1=-1e-3, beta=1.0, learning_rate=0.1), "l1"),
    (lambda: palm_jax.palm_prox(l1=1e-3, beta=0.0, learning_rate=0.1), "beta"),
    (lambda: palm_jax.palm_prox(l1=1e-3, beta=-1.0, learning_rate=0.1), "beta"),
    (lambda: palm_jax.palm_prox(l1=1e-3, beta=1.0, learning_rate=0.0), "learning_rate"),
    (lambda: palm_jax.palm_prox(l1=1e-3, beta=1.0, learning_rate=optax.linear_schedule(0.0, 0.1, 10)),
     "learning_rate"),
    (lambda: palm_jax.soft_threshold(l1=-1.0, learning_rate=0.1), "l1"),
    (lambda: palm_jax.soft_threshold(l1=1.0, learning_rate=-0.1), "learning_rate"),
    (lambda: palm_jax.soft_threshold(l1=1.0, learning_rate=lambda count: count - 0.1), "learning_rate"),
    (lambda: palm_jax.l1_subgradient(l1=-1.0), "l1"),
])
def test_bad_hyperparameters_are_rejected_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make", [lambda mask=None: palm_jax.palm_prox(1.0, 1.0, 0.1, mask=mask),
                                  lambda mask=None: palm_jax.soft_threshold(1.0, 0.1, mask=mask),
                                  lambda mask=None: palm_jax.l1_subgradient(1.0, mask=mask)])
def test_empty_mask_and_missing_params_are_rejected(make):
    with pytest.raises(ValueError, match="mask"):
        make().init({"kernel": jnp.ones((2, 2))})  # no BatchNorm scale
    with pytest.raises(ValueError, match="mask"):
        make({"bn": False, "kernel": False}).init(tree())
    with pytest.raises(ValueError, match="params"):
        make().update(incoming(), make().init(tree()))


def test_sparse_scales_without_palm_state_is_an_error():
    with pytest.raises(ValueError, match="PalmProxState"):
        palm_jax.sparse_scales(tree(), optax.sgd(0.1).init(tree()))
    other = PalmProxState(count=jnp.zeros([], jnp.int32), xi={"elsewhere": {"scale": jnp.ones(4)}})
    with pytest.raises(ValueError, match="other params"):
        palm_jax.sparse_scales(tree(), other)


# ---------------------------------------------------------------- the authors' initialisation of xi


def test_uniform_xi_init_draws_the_authors_range_and_feeds_the_first_step():
    params = {"bn": {"scale": jnp.full(256, 0.5), "bias": jnp.zeros(256)}, "kernel": jnp.ones((2, 256))}
    tx = palm_jax.palm_prox(l1=0.01, beta=10.0, learning_rate=0.1, xi_init="uniform", xi_seed=3)
    state = tx.init(params)
    xi = np.asarray(state.xi["bn"]["scale"])
    assert xi.dtype == np.float32 and xi.min() >= 0.47 and xi.max() < 0.53 and xi.std() > 0.01
    assert all(isinstance(state.xi[k], optax.MaskedNode) for k in ("kernel",))
    assert isinstance(state.xi["bn"]["bias"], optax.MaskedNode)
    np.testing.assert_array_equal(tx.init(params).xi["bn"]["scale"], xi)  # the same seed, the same draw
    other = palm_jax.palm_prox(0.01, 10.0, 0.1, xi_init="uniform", xi_seed=4).init(params).xi["bn"]["scale"]
    assert not np.array_equal(np.asarray(other), xi)
    default = palm_jax.palm_prox(0.01, 10.0, 0.1).init(params).xi["bn"]["scale"]
    np.testing.assert_array_equal(default, params["bn"]["scale"])  # the default is unchanged: a copy
    # the first update starts from the drawn xi: a = 1/lr = 10, gamma = (a*g + beta*xi) / (a + beta)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = tx.update(grads, state, params)
    gamma = (10 * 0.5 + 10 * xi) / 20
    np.testing.assert_allclose(updates["bn"]["scale"], gamma - 0.5, rtol=1e-6, atol=1e-7)
    v = (10 * xi + 10 * gamma) / 20
    np.testing.assert_allclose(new_state.xi["bn"]["scale"], np.sign(v) * np.maximum(np.abs(v) - 0.01 / 20, 0),
                               rtol=1e-6)


def test_uniform_xi_init_keeps_a_bfloat16_dtype_and_rejects_other_names():
    params = {"bn": {"scale": jnp.full(8, 0.5, jnp.bfloat16)}}
    xi = palm_jax.palm_prox(0.01, 10.0, 0.1, xi_init="uniform").init(params).xi["bn"]["scale"]
    assert xi.dtype == jnp.bfloat16 and float(xi.min()) > 0.46 and float(xi.max()) < 0.54
    with pytest.raises(ValueError, match="xi_init"):
        palm_jax.palm_prox(0.01, 10.0, 0.1, xi_init="normal")
