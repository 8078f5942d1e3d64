"""palm_jax.recalibrate_bn: BN statistics equal the moments of the BN inputs over all images, nothing else
changes, the old statistics play no part, and pruning commutes with it (pruned = sparse still holds)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from flax.core import freeze
from test_prune import flat, images, init, logits, perturbed

from palm_jax import recalibrate_bn
from palm_jax.data import normalize
from palm_jax.models import VGG
from palm_jax.pruning import prune


class Block(nn.Module):
    """A submodule holding the second BN: conv -> BN -> ReLU (its mode given at call time)."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(5, (3, 3), name="conv")(x)
        return nn.relu(nn.BatchNorm(name="bn")(h, use_running_average=not train))


class TwoBN(nn.Module):
    """conv -> BN -> ReLU -> dropout -> Block (conv -> BN -> ReLU) -> mean -> Dense: the second BN's input
    depends on how the first one normalises."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(3, name="head")(Block(name="block")(h, train).mean(axis=(1, 2)))


def two_bn(seed=0):
    """TwoBN, 10 images of 8x8 (mean 0.5, std 2) and variables with random BN scales and biases."""
    model = TwoBN()
    x = 0.5 + 2.0 * images(n=10, size=8, seed=seed)
    variables = perturbed(init(model, x, seed), np.random.default_rng(seed), zero=0.0, bias_sign=1.0)
    return model, variables, x


def bn_inputs(model, variables, batch):
    """The inputs of TwoBN's two BNs (its convs' outputs) in a training-mode forward pass, float64."""
    _, state = model.apply(variables, batch, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True)
    seen = state["intermediates"]
    return {"bn": np.float64(seen["conv"]["__call__"][0]),
            ("block", "bn"): np.float64(seen["block"]["conv"]["__call__"][0])}


def stats_of(variables, path):
    stats = variables["batch_stats"]
    for key in (path,) if isinstance(path, str) else path:
        stats = stats[key]
    return np.asarray(stats["mean"]), np.asarray(stats["var"])


def test_statistics_are_the_moments_of_the_bn_inputs_over_all_images():
    model, variables, x = two_bn()
    result = recalibrate_bn(model, variables, x, batch_size=4)  # 2 batches; the last 2 images are not used

    # by hand: each batch through the model in training mode, the BN inputs of both batches pooled
    per_batch = [bn_inputs(model, variables, x[i : i + 4]) for i in (0, 4)]
    for path in ("bn", ("block", "bn")):
        pooled = np.concatenate([inputs[path] for inputs in per_batch])
        mean, var = stats_of(result, path)
        np.testing.assert_allclose(mean, pooled.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, pooled.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        assert mean.dtype == var.dtype == np.float32
    # the second BN's input depends on the first BN normalising each batch with that batch's statistics
    stale = np.float64(model.apply(variables, x[:4], train=False, capture_intermediates=True,
                                   mutable=["intermediates"])[1]["intermediates"]["block"]["conv"]["__call__"][0])
    assert not np.allclose(stale.mean(axis=(0, 1, 2)), per_batch[0][("block", "bn")].mean(axis=(0, 1, 2)),
                           atol=1e-3)


def test_parameters_untouched_and_old_statistics_play_no_part():
    model, variables, x = two_bn(seed=1)
    result = recalibrate_bn(model, freeze(variables), x, batch_size=5)
    assert type(result).__name__ == "FrozenDict" and set(result) == set(variables)
    assert jax.tree.structure(result["params"]) == jax.tree.structure(freeze(variables["params"]))
    for key, value in flat(variables["params"]).items():
        kept = flat(result["params"])[key]
        assert kept.dtype == value.dtype and np.array_equal(kept, value)

    garbage = {key: np.full_like(value, np.nan if key[-1] == "mean" else -np.inf)
               for key, value in flat(variables["batch_stats"]).items()}
    scrambled = {**variables, "batch_stats": traverse_util.unflatten_dict(garbage)}
    again = recalibrate_bn(model, scrambled, x, batch_size=5)
    for path in ("bn", ("block", "bn")):
        for before, after in zip(stats_of(result, path), stats_of(again, path), strict=True):
            np.testing.assert_array_equal(before, after)


def test_dropout_is_off_and_uint8_images_compile_once_with_a_remainder():
    model, variables, _ = two_bn()
    pixels = np.random.default_rng(3).integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    traces = []

    def counted(batch):
        traces.append(batch.shape)
        return normalize(batch)

    result = recalibrate_bn(model, variables, pixels, batch_size=3, preprocess=counted)  # 3 batches + 2 left
    assert traces == [(3, 8, 8, 3)]
    floats = recalibrate_bn(TwoBN(dropout=0.5), variables, normalize(pixels), batch_size=3)
    for path in ("bn", ("block", "bn")):
        for a, b in zip(stats_of(result, path), stats_of(floats, path), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_recalibrating_then_pruning_equals_pruning_then_recalibrating():
    model, x = VGG(depth=11, widths=(8, 8, 16, 16, 16, 16, 16, 16)), images(n=16, size=32)
    # positive biases: removed channels emit constants, folded into the next BN's mean or kept as carriers
    sparse = perturbed(init(model, x), np.random.default_rng(2), bias_sign=1.0)
    recalibrated = recalibrate_bn(model, sparse, x, batch_size=8)
    first = prune(model, recalibrated, probe=x[:4])
    pruned = prune(model, sparse, probe=x[:4])
    then = recalibrate_bn(pruned.model, pruned.variables, x, batch_size=8)

    assert first.model.widths == pruned.model.widths and sum(pruned.model.widths) < sum(model.widths)
    assert pruned.report["fold"]["carriers"]
    for key, value in flat(first.variables["params"]).items():
        np.testing.assert_array_equal(value, flat(then["params"])[key])
    for key, value in flat(first.variables["batch_stats"]).items():
        np.testing.assert_allclose(value, flat(then["batch_stats"])[key], rtol=1e-4, atol=1e-5)
    expected = logits(model, recalibrated, x)
    assert not np.allclose(expected, logits(model, sparse, x), atol=1e-2)  # the statistics did change
    np.testing.assert_allclose(logits(pruned.model, then, x), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(first.model, first.variables, x), expected, atol=1e-4, rtol=0)


class Unit(nnx.Module):
    def __init__(self, cin, cout, rngs):
        self.conv = nnx.Conv(cin, cout, (1, 1), rngs=rngs)
        self.bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class NNXNet(nnx.Module):
    """1x1 conv -> BN -> ReLU -> dropout (active: NNX modules start in training mode) -> 1x1 conv -> BN ->
    ReLU -> mean -> Linear, the BNs inside submodules."""

    def __init__(self, rngs):
        self.first, self.drop = Unit(3, 4, rngs), nnx.Dropout(0.5, rngs=rngs)
        self.second, self.head = Unit(4, 5, rngs), nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.second(self.drop(self.first(x))).mean(axis=(1, 2)))


def test_nnx_statistics_are_the_moments_of_the_bn_inputs_and_the_module_is_unchanged():
    model, x = NNXNet(nnx.Rngs(0)), 0.5 + 2.0 * np.asarray(images(n=9, size=4, seed=4), np.float64)
    rng = np.random.default_rng(4)
    model.first.bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    model.first.bn.bias[...] = jnp.asarray(rng.normal(0, 0.5, 4), jnp.float32)
    garbage = nnx.clone(model)  # its state, with garbage running statistics, is passed as `variables`
    garbage.first.bn.mean[...], garbage.second.bn.var[...] = jnp.full(4, jnp.nan), jnp.full(5, -jnp.inf)
    before = {kind: jax.tree.map(np.array, nnx.state(model, kind)) for kind in (nnx.Param, nnx.BatchStat)}

    result = recalibrate_bn(model, nnx.state(garbage), np.float32(x), batch_size=4)  # 2 batches, 1 unused

    def conv(unit, h):
        return h @ np.float64(unit.conv.kernel[...][0, 0]) + np.float64(unit.conv.bias[...])

    inputs = {"first": [], "second": []}
    for batch in (x[:4], x[4:8]):  # by hand, float64: each BN normalises with its batch's moments
        h = conv(model.first, batch)
        bn = model.first.bn
        a = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + bn.epsilon)
        a = np.maximum(a * np.float64(bn.scale[...]) + np.float64(bn.bias[...]), 0)
        inputs["first"].append(h)
        inputs["second"].append(conv(model.second, a))
    for name, seen in inputs.items():
        pooled, bn = np.concatenate(seen), getattr(result, name).bn
        np.testing.assert_allclose(bn.mean[...], pooled.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], pooled.var((0, 1, 2)), rtol=1e-5, atol=1e-6)

    assert result is not model and type(result) is NNXNet
    assert result.drop.deterministic is False and result.first.bn.use_running_average is False
    for kind, values in before.items():  # the input module is unchanged; the result has its parameters
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model, kind)), values)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(result, nnx.Param), before[nnx.Param])


class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        bn = nn.BatchNorm(use_running_average=not train)
        return bn(bn(x)).mean(axis=(1, 2))


class NNXPlain(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.linear(x.mean(axis=(1, 2)))


def variables_of(model, x):
    return model.init(jax.random.key(0), x[:1], train=False)


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "images is empty"),
        ("rank", r"images must be an array \[N, \.\.\.\]"),
        ("channels", r"fails on a batch of shape \(2, 8, 8, 4\)"),
        ("large batch", "batch_size 11 is larger than the 10 images"),
        ("zero batch", "batch_size must be >= 1"),
        ("batches", "num_batches 6 exceeds the 5 full batches"),
        ("uint8", "images are uint8; pass normalised floats, or preprocess="),
        ("no bn", "calls no nn.BatchNorm"),
        ("twice", "called more than once per forward pass"),
        ("nnx no bn", "calls no nnx.BatchNorm"),
    ],
)
def test_bad_input_is_refused_in_one_line(case, match):
    model, variables, x = two_bn()
    kwargs = {"batch_size": 2}
    if case == "empty":
        x = x[:0]
    elif case == "rank":
        x = np.zeros(8, np.float32)
    elif case == "channels":
        x = jnp.concatenate([x, x[..., :1]], axis=-1)
    elif case == "large batch":
        kwargs["batch_size"] = 11
    elif case == "zero batch":
        kwargs["batch_size"] = 0
    elif case == "batches":
        kwargs["num_batches"] = 6
    elif case == "uint8":
        x = np.zeros((10, 8, 8, 3), np.uint8)
    elif case in ("no bn", "twice"):
        model = {"no bn": Plain(), "twice": Twice()}[case]
        variables = variables_of(model, x)
    elif case == "nnx no bn":
        model, variables = NNXPlain(), None
    with pytest.raises(ValueError, match=match) as err:
        recalibrate_bn(model, variables, x, **kwargs)
    assert "\n" not in str(err.value)

