"""palm_jax.models: shapes, parameter counts, NS initialisation, BN modes, the width protocol, bf16."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palm_jax.models import VGG, DenseNet, PreResNet
from palm_jax.models import layers as layers_lib
from palm_jax.models.vgg import VGG_CFG

SMALL = [VGG(depth=11), PreResNet(depth=11), DenseNet(depth=10, growth_rate=6)]
SMALL_IDS = ["vgg11", "preresnet11", "densenet10"]


def images(n=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 32, 3))


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def trace_layers(model):
    """Abstract init (no compute): the variables' shapes and the (path, module) of every Conv, BatchNorm and
    Dense layer in call order."""
    layers = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(
            context.module, (nn.Conv, nn.BatchNorm, nn.Dense)
        ):
            layers.append((context.module.path, context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1), train=False))
    return variables, layers


def traced_convs(model):
    """The kernel shape of every conv in call order, and the abstract variables."""
    variables, layers = trace_layers(model)
    shapes = []
    for path, module in layers:
        if isinstance(module, nn.Conv):
            node = variables["params"]
            for name in path:
                node = node[name]
            shapes.append(node["kernel"].shape)
    return shapes, variables


def random_variables(model, seed=0):
    """Variables of the right shapes without running (and compiling) init: He-scaled kernels, and BN scales,
    biases and running statistics away from their initial values so that eval mode is not the identity."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, trace_layers(model)[0])


def apply_fn(model, train=False, **kwargs):
    return jax.jit(functools.partial(model.apply, train=train, **kwargs))


# ---- analytic parameter counts, from the NS architecture descriptions


def conv_bn(cin, cout, k):
    return k * k * cin * cout + 2 * cout


def vgg_count(depth, num_classes=10):
    total, cin = 0, 3
    for c in VGG_CFG[depth]:
        if c != "M":
            total, cin = total + conv_bn(cin, c, 3), c
    return total + cin * num_classes + num_classes


def preresnet_count(depth, num_classes=10):
    n = (depth - 2) // 9
    total, cin = 27 * 16, 16
    for planes in (16, 32, 64):
        for b in range(n):
            total += 2 * cin + cin * planes  # bn1, conv1
            total += 2 * planes + 9 * planes * planes  # bn2, conv2
            total += 2 * planes + planes * 4 * planes  # bn3, conv3
            if b == 0:
                total += cin * 4 * planes  # downsample
            cin = 4 * planes
    return total + 2 * cin + cin * num_classes + num_classes


def densenet_count(depth, growth, num_classes=10):
    n = (depth - 4) // 3
    total, c = 27 * 2 * growth, 2 * growth
    for block in range(3):
        for _ in range(n):
            total, c = total + 2 * c + 9 * c * growth, c + growth
        if block < 2:
            total += 2 * c + c * c
    return total + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize(
    "model, expected",
    [
        (VGG(depth=19), vgg_count(19)),
        (VGG(depth=11), vgg_count(11)),
        (PreResNet(depth=164), preresnet_count(164)),
        (PreResNet(depth=20), preresnet_count(20)),
        (DenseNet(depth=40), densenet_count(40, 12)),
        (DenseNet(depth=10, growth_rate=6), densenet_count(10, 6)),
    ],
    ids=["vgg19", "vgg11", "preresnet164", "preresnet20", "densenet40", "densenet10"],
)
def test_param_count_matches_analytic_count(model, expected):
    _, variables = traced_convs(model)
    assert count(variables["params"]) == expected


def test_vgg19_has_the_20_04m_params_of_network_slimming():
    _, variables = traced_convs(VGG(depth=19))
    assert round(count(variables["params"]) / 1e6, 2) == 20.04


# ---- forward pass


@pytest.mark.parametrize("model", SMALL, ids=SMALL_IDS)
def test_output_shape_and_dtype(model):
    logits = apply_fn(model)(random_variables(model), images(3))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    other = model.clone(num_classes=7)
    assert jax.eval_shape(apply_fn(other), trace_layers(other)[0], images(2)).shape == (2, 7)


def test_train_mode_updates_batch_stats_with_pytorch_momentum_and_eval_mode_does_not():
    model = VGG(depth=11, widths=(8, 8, 8, 8, 8, 8, 8, 8))
    x = images(4) + 1.0
    variables = random_variables(model)
    train_step, evaluate = apply_fn(model, train=True, mutable=["batch_stats"]), apply_fn(model)
    in_batch, updated = train_step(variables, x)
    # Running statistics of bn0 move 10% of the way to the batch statistics of conv0's output (PyTorch
    # momentum 0.1); Flax keeps the biased batch variance.
    kernel = variables["params"]["conv0"]["kernel"]
    conv0 = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    old = variables["batch_stats"]["bn0"]
    new = updated["batch_stats"]["bn0"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv0.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv0.var(axis=(0, 1, 2)), rtol=1e-4)
    logits, unchanged = apply_fn(model, mutable=["batch_stats"])(variables, x)
    for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Eval mode treats samples independently; train mode normalises with the batch.
    alone = evaluate(variables, x[:1])
    np.testing.assert_allclose(logits[:1], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(in_batch[:1], alone, atol=1e-4)


# ---- initialisation


def test_initialisation_follows_network_slimming():
    model = VGG(depth=11, widths=(8, 8, 8, 8, 8, 8, 256, 512))
    key = jax.random.key(1, impl="rbg")  # threefry's sampler compiles several times slower on CPU
    params = jax.jit(functools.partial(model.init, train=False))(key, images(1))["params"]
    for i in range(len(model.widths)):
        assert set(params[f"conv{i}"]) == {"kernel"}  # no conv bias
        np.testing.assert_array_equal(params[f"bn{i}"]["scale"], 0.5)
        np.testing.assert_array_equal(params[f"bn{i}"]["bias"], 0.0)
    kernel = np.asarray(params["conv7"]["kernel"])  # 3x3x256x512: 1.2M samples
    std = np.sqrt(2.0 / (3 * 3 * 512))  # He normal over fan-out
    assert abs(kernel.std() / std - 1) < 0.01 and abs(kernel.mean()) < 0.01 * std
    assert np.abs(kernel).max() > 4 * std  # untruncated normal
    fc = params["fc"]
    assert abs(float(fc["kernel"].std()) / 0.01 - 1) < 0.05
    np.testing.assert_array_equal(fc["bias"], 0.0)


@pytest.mark.parametrize("model", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_every_layer_is_built_by_the_shared_factories(model, dtype):
    _, layers = trace_layers(model.clone(dtype=dtype))
    kinds = {type(m) for _, m in layers}
    assert kinds == {nn.Conv, nn.BatchNorm, nn.Dense}
    for _, m in layers:
        assert m.param_dtype == jnp.float32 and m.dtype == dtype
        if isinstance(m, nn.Conv):
            pad = m.kernel_size[0] // 2
            assert m.kernel_init is layers_lib.conv_kernel_init and not m.use_bias
            assert tuple(map(tuple, m.padding)) == ((pad, pad), (pad, pad))
        elif isinstance(m, nn.BatchNorm):
            assert m.scale_init is layers_lib.bn_scale_init
            assert (m.momentum, m.epsilon) == (0.9, 1e-5)
        else:
            assert m.kernel_init is layers_lib.dense_kernel_init


# ---- width protocol


@pytest.mark.parametrize("model", SMALL, ids=SMALL_IDS)
def test_widths_list_every_conv_in_creation_order(model):
    shapes, _ = traced_convs(model)
    assert [s[-1] for s in shapes] == list(model.widths)


def test_default_widths_follow_the_architecture():
    assert VGG(depth=19).widths == tuple(c for c in VGG_CFG[19] if c != "M")
    assert PreResNet(depth=11).widths == (16, 16, 16, 64, 64, 32, 32, 128, 128, 64, 64, 256, 256)
    assert len(PreResNet(depth=164).widths) == 9 * 18 + 4
    assert DenseNet(depth=10, growth_rate=4).widths == (8, 4, 4, 16, 4, 4, 24, 4, 4)
    assert len(DenseNet().widths) == 39


@pytest.mark.parametrize("model", SMALL, ids=SMALL_IDS)
def test_clone_with_smaller_widths_builds_the_smaller_model(model):
    rng = np.random.default_rng(0)
    smaller = tuple(
        max(1, int(w * f))
        for w, f in zip(model.widths, rng.uniform(0.2, 0.9, len(model.widths)), strict=True)
    )
    if isinstance(model, PreResNet):  # per stage, every conv3 and the downsample conv share one width
        smaller, i = list(smaller), 1
        for _ in range(3):
            tied = []
            for b in range((model.depth - 2) // 9):
                tied += [i + 2, i + 3] if b == 0 else [i + 2]
                i += 4 if b == 0 else 3
            for j in tied:
                smaller[j] = smaller[tied[0]]
        smaller = tuple(smaller)
    pruned = model.clone(widths=list(smaller))
    assert pruned.widths == smaller and isinstance(pruned.widths, tuple)
    assert model.widths != smaller  # the original is untouched
    assert model.clone().widths == model.widths
    shapes, variables = traced_convs(pruned)
    assert [s[-1] for s in shapes] == list(smaller)
    assert count(variables["params"]) < count(traced_convs(model)[1]["params"])
    assert apply_fn(pruned)(random_variables(pruned), images(2)).shape == (2, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VGG(depth=11, widths=(8,) * 7),
        lambda: VGG(depth=11, widths=(8,) * 7 + (0,)),
        lambda: PreResNet(depth=11, widths=(16,) * 12 + (-1,)),
        lambda: DenseNet(depth=10, widths=(8, 4.5, 4, 16, 4, 4, 24, 4, 4)),
        lambda: VGG(depth=11).clone(widths=(8,) * 9),
    ],
    ids=["short", "zero", "negative", "float", "clone"],
)
def test_bad_widths_raise_naming_widths(make):
    with pytest.raises(ValueError, match="widths"):
        make()


def test_preresnet_rejects_untied_residual_widths():
    widths = list(PreResNet(depth=20).widths)
    widths[1 + 4 + 2] = 63  # conv3 of stage1_block1, added to the 64-wide residual stream
    with pytest.raises(ValueError, match="widths of stage 1"):
        PreResNet(depth=20, widths=tuple(widths))


@pytest.mark.parametrize(
    "make",
    [lambda: VGG(depth=12), lambda: PreResNet(depth=12), lambda: DenseNet(depth=11)],
    ids=["vgg", "preresnet", "densenet"],
)
def test_bad_depth_raises_naming_depth(make):
    with pytest.raises(ValueError, match="depth"):
        make()


# ---- compute dtype


def test_bfloat16_compute_keeps_float32_params():
    model = DenseNet(depth=7, growth_rate=4, dtype=jnp.bfloat16)
    abstract = trace_layers(model)[0]
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    variables = random_variables(model)
    logits, state = apply_fn(model, capture_intermediates=True, mutable=["intermediates"])(
        variables, images(2)
    )
    assert state["intermediates"]["conv0"]["__call__"][0].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    reference = apply_fn(model.clone(dtype=jnp.float32))(variables, images(2))
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()) + 1e-3)


# ---- selections (the BN input gathers of a pruned PreResNet / DenseNet)


@pytest.mark.parametrize("model", SMALL[1:], ids=SMALL_IDS[1:])
def test_selections_gather_each_bn_input(model):
    variables = random_variables(model)
    n_bns = sum(isinstance(m, nn.BatchNorm) for _, m in trace_layers(model)[1])
    # bn_final reads the last stream: DenseNet's last concatenation, PreResNet's residual stream
    width = model.widths[-3] + 2 * model.growth_rate if isinstance(model, DenseNet) else model.widths[-1]
    identity = model.clone(selections=(None,) * (n_bns - 1) + (tuple(range(width)),))
    np.testing.assert_allclose(apply_fn(identity)(variables, images(2)),
                               apply_fn(model)(variables, images(2)), rtol=1e-6, atol=1e-6)
    picked = model.clone(selections=(None,) * (n_bns - 1) + ((width - 1, 0, 2),))
    shapes = jax.eval_shape(lambda: picked.init(jax.random.PRNGKey(0), images(1), train=False))
    assert shapes["params"]["bn_final"]["scale"].shape == (3,)
    assert shapes["params"]["fc"]["kernel"].shape == (3, 10)
    with pytest.raises(ValueError, match="selections"):
        model.clone(selections=(None,) * (n_bns - 2))
    with pytest.raises(ValueError, match="selections"):
        model.clone(selections=(None,) * (n_bns - 1) + ((-1,),))
    with pytest.raises(ValueError, match="selections"):
        too_far = model.clone(selections=(None,) * (n_bns - 1) + ((width,),))
        jax.eval_shape(lambda: too_far.init(jax.random.PRNGKey(0), images(1), train=False))
