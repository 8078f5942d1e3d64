"""palm_jax.prune: pruned models give the unpruned outputs, on NS's CNNs and on a user's own CNN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from palm_jax.models import VGG, DenseNet, PreResNet
from palm_jax.pruning import prune
from palm_jax.pruning.report import forward_flops


class UserNet(nn.Module):
    """A user's CNN exposing `widths`: convs, BN, a residual add, a concatenation read by a BN, pools, Dense.

        a = conv0(x); b = conv2(relu(bn_b(conv1(relu(bn_a(a)))))); s = avg_pool(a + b)
        d = conv3(relu(bn_s(s))); u = relu(bn_u(concat[s, d])); logits = dense(flatten(max_pool(u)))

    `kernel=1` makes every conv 1x1 (no zero padding anywhere); widths[0] and widths[2] are added together.
    """

    widths: tuple[int, ...] = (8, 6, 8, 5)
    kernel: int = 3
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        w, k = self.widths, (self.kernel, self.kernel)
        bn = functools.partial(nn.BatchNorm, use_running_average=not train)
        a = nn.Conv(w[0], k, use_bias=False, name="conv0")(x)
        h = nn.relu(bn(name="bn_a")(a))
        h = nn.relu(bn(name="bn_b")(nn.Conv(w[1], k, use_bias=False, name="conv1")(h)))
        s = nn.avg_pool(a + nn.Conv(w[2], (1, 1), name="conv2")(h), (2, 2), (2, 2))
        d = nn.Conv(w[3], k, use_bias=False, name="conv3")(nn.relu(bn(name="bn_s")(s)))
        u = nn.relu(bn(name="bn_u")(jnp.concatenate([s, d], axis=-1)))
        u = nn.max_pool(u, (4, 4), (4, 4))
        return nn.Dense(self.num_classes, name="dense")(u.reshape(u.shape[0], -1))


class RawRead(nn.Module):
    """conv0's raw output also feeds conv2, so its channels are never removable (zero BN scale or not)."""

    widths: tuple[int, ...] = (6, 4, 4)

    @nn.compact
    def __call__(self, x, train: bool):
        a = nn.Conv(self.widths[0], (1, 1), use_bias=False)(x)
        b = nn.Conv(self.widths[1], (1, 1))(nn.relu(nn.BatchNorm(use_running_average=not train)(a)))
        c = nn.Conv(self.widths[2], (1, 1))(a)
        return (b + c).mean(axis=(1, 2))


O0 = {"xla_backend_optimization_level": 0}  # programs that run a few times here: compile fast


def images(n=4, size=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def init(model, x, seed=0):
    """Variables of the model's shapes without running init: He-scaled kernels, small biases, BN at rest."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x[:1])
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        value = {"scale": 1.0, "var": 1.0}.get(name, 0.0)
        noise = rng.normal(0, 0.1, leaf.shape) if name == "bias" else 0.0
        return (np.full(leaf.shape, value) + noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def flat(params):
    return traverse_util.flatten_dict(jax.tree.map(np.array, params))


def perturbed(variables, rng, *, zero=0.5, bias_sign=-1.0):
    """Random BN scales, a random `zero` fraction of them exactly 0, biases of sign `bias_sign` (<= 0 exact)
    and running statistics away from 0 / 1, so that eval mode is not an identity."""
    params, stats = flat(variables["params"]), flat(variables["batch_stats"])
    for key in [k for k in params if k[-1] == "scale" and k[:-1] + ("mean",) in stats]:
        n = params[key].shape[0]
        params[key] = rng.uniform(0.2, 1.0, n).astype(np.float32)
        params[key][rng.choice(n, int(round(n * zero)), replace=False)] = 0.0
        params[key[:-1] + ("bias",)] = (bias_sign * rng.uniform(0.0, 0.3, n)).astype(np.float32)
        stats[key[:-1] + ("mean",)] = rng.normal(0, 0.2, n).astype(np.float32)
        stats[key[:-1] + ("var",)] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    unflatten = traverse_util.unflatten_dict
    return {"params": unflatten(params), "batch_stats": unflatten(stats)}


def with_zeros(variables, zeros):
    """`variables` with the BN scales at {module: positions} set to exactly 0."""
    params = flat(variables["params"])
    for module, positions in zeros.items():
        params[(module, "scale")][positions] = 0.0
    return {"params": traverse_util.unflatten_dict(params), "batch_stats": variables["batch_stats"]}


def logits(model, variables, x):
    """Eval-mode outputs at full float32 precision, compiled without backend optimisations (each program
    runs once here)."""
    with jax.default_matmul_precision("highest"):
        forward = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
        return np.asarray(forward.compile(O0)(variables, x))


def bn_scales(variables, module):
    return np.asarray(variables["params"][module]["scale"])


@pytest.mark.parametrize("kernel", [1, 3])
def test_user_model_zero_scales_give_identical_logits(kernel):
    model, x = UserNet(kernel=kernel), images()
    variables = perturbed(init(model, x), np.random.default_rng(kernel))
    variables = with_zeros(variables, {"bn_a": [2], "bn_s": [2], "bn_u": [2]})  # a residual channel
    result = prune(model, variables, probe=x)

    scale = {m: bn_scales(variables, m) for m in ("bn_a", "bn_b", "bn_s", "bn_u")}
    w0 = model.widths[0]
    residual_kept = (scale["bn_a"] != 0) | (scale["bn_s"] != 0) | (scale["bn_u"][:w0] != 0)
    expected = (int(residual_kept.sum()), int((scale["bn_b"] != 0).sum()), int(residual_kept.sum()),
                int((scale["bn_u"][w0:] != 0).sum()))
    assert result.model.widths == expected and expected[0] < model.widths[0]
    assert result.report["params_after"] < result.report["params_before"]
    assert result.report["flops_after"] < result.report["flops_before"]
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(model, variables, x),
                               atol=1e-5, rtol=0)
    assert result.report["max_logit_deviation"] < 1e-5
    kept = np.flatnonzero(residual_kept)
    np.testing.assert_array_equal(bn_scales(result.variables, "bn_s"), scale["bn_s"][kept])


def test_folding_is_exact_with_carriers_and_closest_constant_without():
    x = images()
    for kernel in (1, 3):
        model = UserNet(kernel=kernel)
        variables = perturbed(init(model, x), np.random.default_rng(7), bias_sign=1.0)
        variables = with_zeros(variables, {"bn_a": [0, 1], "bn_s": [0, 1], "bn_u": [0, 1]})  # residual too
        folded = prune(model, variables, probe=x)
        close = prune(model, variables, probe=x, exact=False)
        raw = prune(model, variables, probe=x, fold=False)
        assert close.model.widths == raw.model.widths != model.widths
        deviation = np.max(np.abs(logits(folded.model, folded.variables, x) - logits(model, variables, x)))
        assert deviation == pytest.approx(folded.report["max_logit_deviation"], abs=1e-6)
        assert deviation < 1e-5 < 1e-3 < raw.report["max_logit_deviation"]
        assert folded.report["fold"]["unabsorbed"] == [] == folded.report["fold"]["approximate"]
        if kernel == 1:  # no padding: the constants fold into the next BN means exactly, nothing is kept
            assert folded.model.widths == raw.model.widths and folded.report["fold"]["carriers"] == []
        else:  # padding: a constant input (scale 0) carries the constants; without it, the closest constant
            assert folded.report["fold"]["carriers"]
            assert sum(raw.model.widths) <= sum(folded.model.widths) < sum(model.widths)
            assert close.report["fold"]["approximate"] and close.report["fold"]["carriers"] == []
            assert 1e-5 < close.report["max_logit_deviation"] < raw.report["max_logit_deviation"] / 2


ARCHITECTURES = {
    "vgg11": VGG(depth=11),
    "preresnet11": PreResNet(depth=11),
    "densenet10": DenseNet(depth=10, growth_rate=6),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_prune_to_the_same_logits(name):
    model, x = ARCHITECTURES[name], images(size=32)
    variables = init(model, x)
    exact = perturbed(variables, np.random.default_rng(0))
    result = prune(model, exact, probe=x)
    assert result.report["params_after"] < result.report["params_before"]
    assert type(result.model) is type(model) and result.model.depth == model.depth
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(model, exact, x),
                               atol=1e-5, rtol=0)

    # positive BN biases: removed channels emit relu(bias) > 0, read through zero padding by the next conv
    positive = perturbed(variables, np.random.default_rng(0), bias_sign=1.0)
    folded = prune(model, positive, probe=x)
    np.testing.assert_allclose(logits(folded.model, folded.variables, x), logits(model, positive, x),
                               atol=1e-5, rtol=0)
    assert folded.report["fold"]["carriers"] and folded.report["fold"]["approximate"] == []
    assert result.report["params_after"] <= folded.report["params_after"] < folded.report["params_before"]
    close = prune(model, positive, probe=x, exact=False)
    raw = prune(model, positive, probe=x, fold=False)
    assert close.model.widths == result.model.widths
    # a carrier is a removed BN channel kept (scale 0), unless a kept input was constant already
    carriers = folded.report["fold"]["carrier_channels"]
    assert folded.report["bn_channels_after"] - close.report["bn_channels_after"] == carriers
    assert close.report["max_logit_deviation"] < raw.report["max_logit_deviation"] / 2
    assert close.report["fold"]["absorbed"] and close.report["fold"]["unabsorbed"] == []


def test_residual_width_is_pruned_only_where_every_reading_bn_is_zero():
    model, x = PreResNet(depth=11), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(3), zero=0.0)
    params = flat(variables["params"])
    params[("stage3_block0", "bn3", "scale")][:] = 0.0  # in-block channels: conv2 -> bn3 only
    params[("bn_final", "scale")][:10] = 0.0  # stage 3's residual width is read by bn_final alone
    params[("stage2_block0", "bn1", "scale")][:] = 0.0  # stage 1's is also read raw by a downsample conv
    variables = {"params": traverse_util.unflatten_dict(params), "batch_stats": variables["batch_stats"]}
    result = prune(model, variables, probe=x)
    widths = {layer["layer"]: layer["after"] for layer in result.report["layers"]}
    assert widths["stage3_block0/conv2"] == 1  # never emptied: min_channels=1
    assert widths["stage3_block0/conv3"] == widths["stage3_block0/downsample"] == 256 - 10
    assert widths["stage2_block0/downsample"] == 128 and widths["stage1_block0/conv3"] == 64
    clamped = [layer["layer"] for layer in result.report["layers"] if layer["clamped"]]
    assert clamped == ["stage3_block0/conv2"]
    assert result.report["kept_meeting_criterion"] > 0
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(model, variables, x),
                               atol=1e-5, rtol=0)


def test_channels_read_without_a_bn_are_kept():
    model, x = RawRead(), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(0), zero=1.0)
    result = prune(model, variables, probe=x)
    assert result.model.widths == model.widths
    assert result.report["kept_meeting_criterion"] == model.widths[0]


def test_percent_is_network_slimmings_global_rule():
    model, x = UserNet(), images()
    variables = perturbed(init(model, x), np.random.default_rng(5), zero=0.0)
    result = prune(model, variables, percent=40, probe=x)

    scale = {m: np.abs(bn_scales(variables, m)) for m in ("bn_a", "bn_b", "bn_s", "bn_u")}
    everything = np.sort(np.concatenate(list(scale.values())))
    threshold = everything[int(len(everything) * 40 / 100)]  # NS: sorted[int(total * percent)]
    w0 = model.widths[0]
    residual = np.maximum.reduce([scale["bn_a"], scale["bn_s"], scale["bn_u"][:w0]]) > threshold
    expected = (residual.sum(), (scale["bn_b"] > threshold).sum(), residual.sum(),
                (scale["bn_u"][w0:] > threshold).sum())
    assert result.report["threshold"] == pytest.approx(float(threshold))
    assert result.model.widths == tuple(int(max(e, 1)) for e in expected)


def test_min_channels_keeps_the_largest_scales():
    model, x = UserNet(), images()
    variables = perturbed(init(model, x), np.random.default_rng(2), zero=0.0)
    params = flat(variables["params"])
    params[("bn_b", "scale")] = np.asarray([0.05, -0.3, 0.1, 0.2, -0.01, 0.15], np.float32)
    variables = {"params": traverse_util.unflatten_dict(params), "batch_stats": variables["batch_stats"]}
    result = prune(model, variables, threshold=1.0, min_channels=3, probe=x)  # every scale meets it
    assert result.model.widths == (3, 3, 3, 3)
    assert [layer["clamped"] for layer in result.report["layers"]] == [True, True, True, True]
    np.testing.assert_allclose(bn_scales(result.variables, "bn_b"), [-0.3, 0.2, 0.15])
    residual = np.maximum.reduce([np.abs(bn_scales(variables, m))[:8] for m in ("bn_a", "bn_s", "bn_u")])
    kept = np.sort(np.argsort(-residual)[:3])
    np.testing.assert_array_equal(bn_scales(result.variables, "bn_s"), bn_scales(variables, "bn_s")[kept])

    result = prune(model, variables, threshold=0.12, min_channels=2, probe=x)  # bn_b: 3 of 6 pass
    assert result.model.widths[1] == 3
    assert not result.report["layers"][1]["clamped"]


def test_pruned_model_trains_under_jit_and_prunes_again():
    model, x = UserNet(kernel=1), images(n=8)
    variables = perturbed(init(model, x), np.random.default_rng(4))
    first = prune(model, variables, probe=x)
    labels = jnp.arange(8) % model.num_classes
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, stats, opt_state):
        def loss_fn(params):
            out, updates = first.model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                             mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, loss

    params, stats = first.variables["params"], first.variables["batch_stats"]
    opt_state = tx.init(params)
    step = jax.jit(step).lower(params, stats, opt_state).compile(O0)
    losses = []
    for _ in range(5):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, first.variables["params"])

    trained = flat(params)
    trained[("bn_b", "scale")][0] = 0.0
    trained[("bn_b", "bias")][0] = -1.0
    again_vars = {"params": traverse_util.unflatten_dict(trained), "batch_stats": stats}
    again = prune(first.model, again_vars, probe=x)
    assert again.model.widths[1] == first.model.widths[1] - 1
    np.testing.assert_allclose(logits(again.model, again.variables, x), logits(first.model, again_vars, x),
                               atol=1e-5, rtol=0)


class ConvDense(nn.Module):
    """For the FLOP count: a padded conv, a valid strided conv, a flatten and a Dense layer."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID", use_bias=False)(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _valid_taps(size, kernel, stride, pad):
    """Sum over output positions of the kernel taps that land inside the input (one spatial dimension)."""
    out = (size + 2 * pad - kernel) // stride + 1
    return sum(sum(0 <= o * stride - pad + t < size for t in range(kernel)) for o in range(out))


def test_flops_match_an_analytic_count():
    model = ConvDense()
    variables = init(model, jnp.ones((1, 9, 9, 3)))
    conv1 = 2 * 3 * 8 * _valid_taps(9, 3, 1, 1) ** 2
    conv2 = 2 * 8 * 4 * _valid_taps(9, 3, 2, 0) ** 2
    dense = 2 * (4 * 4 * 4) * 10 + 10  # multiply-adds plus the bias add
    assert forward_flops(model, variables, (9, 9, 3)) == conv1 + conv2 + dense
    compiled = jax.jit(functools.partial(model.apply, train=False)).lower(variables, jnp.ones((1, 9, 9, 3)))
    assert compiled.compile().cost_analysis()["flops"] == conv1 + conv2 + dense


def test_bad_arguments_name_the_fix():
    model, x = UserNet(), images()
    variables = init(model, x)
    for kwargs, match in [
        ({"percent": 100}, "percent"),
        ({"percent": -1}, "percent"),
        ({"threshold": -0.1}, "threshold"),
        ({"min_channels": 0}, "min_channels"),
        ({"threshold": 0.1, "percent": 10}, "either"),
    ]:
        with pytest.raises(ValueError, match=match):
            prune(model, variables, probe=x, **kwargs)
    with pytest.raises(ValueError, match="batch_stats"):
        prune(model, {"params": variables["params"]}, probe=x)
    with pytest.raises(ValueError, match="shape"):
        prune(model, init(UserNet(widths=(8, 5, 8, 5)), x), probe=x)
    with pytest.raises(ValueError, match="probe"):
        prune(model, variables, probe=jnp.ones((2, 16)))


class NoWidths(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (1, 1))(x))
        return x.mean(axis=(1, 2))


class TwoConvs(nn.Module):
    """Two conv -> BN -> ReLU layers; `order` says which widths entry each conv reads."""

    widths: tuple[int, ...] = (4, 6)
    order: tuple[int, int] = (0, 1)

    @nn.compact
    def __call__(self, x, train: bool):
        for i in self.order:
            x = nn.Conv(self.widths[i], (1, 1), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_widths_entries_are_matched_to_convs_by_init_shapes():
    x = images(size=8)
    swapped = TwoConvs(order=(1, 0))  # the first conv applied reads widths[1]
    variables = perturbed(init(swapped, x), np.random.default_rng(0), zero=0.5)
    result = prune(swapped, variables, probe=x)
    assert result.model.widths == (2, 3)
    assert [layer["layer"] for layer in result.report["layers"]] == ["Conv_1", "Conv_0"]
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(swapped, variables, x),
                               atol=1e-5, rtol=0)


def test_models_outside_the_width_protocol_are_refused():
    x = images(size=8)
    with pytest.raises(ValueError, match="no concrete `widths`"):
        prune(NoWidths(), init(NoWidths(), x), probe=x)
    shared = TwoConvs(widths=(4, 4), order=(0, 0))  # both convs read widths[0], widths[1] is unused
    with pytest.raises(ValueError, match=r"width protocol: widths\[1\] sets the output width of no conv"):
        prune(shared, init(shared, x), probe=x)
    short = TwoConvs(widths=(4,), order=(0, 0))
    with pytest.raises(ValueError, match="1 entries but the forward pass applies 2 convs"):
        prune(short, init(short, x), probe=x)


def test_a_carrier_that_changes_no_kernel_is_counted_but_not_listed():
    model, x = UserNet(kernel=3), images()
    variables = perturbed(init(model, x), np.random.default_rng(9), zero=0.0, bias_sign=1.0)
    variables = with_zeros(variables, {"bn_a": [0], "bn_s": [0], "bn_u": [0]})  # one residual channel
    result = prune(model, variables, probe=x)
    # its constant would be read through conv1's and conv3's zero padding: it stays as their carrier, the
    # only removed channel they read, so no kernel changes and no channel is removed
    assert result.model.widths == model.widths
    assert result.report["fold"]["carrier_channels"] == 1 and result.report["fold"]["carriers"] == []
    assert result.report["kept_meeting_criterion"] == 0  # carriers are counted apart
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(model, variables, x),
                               atol=1e-5, rtol=0)
