"""palm_jax.prune: per-consumer channel selection, depthwise / grouped convs, padded pools, refusal, FLOPs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_prune import UserNet, flat, images, init, logits, perturbed, with_zeros

from palm_jax.models import VGG, DenseNet, PreResNet
from palm_jax.pruning import api, flops, prune
from palm_jax.pruning.flops import inlining_keeps_count
from palm_jax.pruning.report import forward_flops


def bn_scales(variables, module: str) -> np.ndarray:
    return np.asarray(flat(variables["params"])[(*module.split("/"), "scale")])


def nonzero(variables, module) -> int:
    return int(np.sum(bn_scales(variables, module) != 0))


def assert_same_logits(result, model, variables, x):
    np.testing.assert_allclose(logits(result.model, result.variables, x), logits(model, variables, x),
                               atol=1e-5, rtol=0)
    assert result.report["check"]["relative_deviation"] < 1e-6


def bn_after(result) -> dict:
    return {b["bn"]: b["after"] for b in result.report["batchnorms"]}


def test_preresnet_bns_drop_their_own_zero_channels_from_the_shared_stream():
    model, x = PreResNet(depth=11), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(0))  # half of every BN's scales are 0
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    # negative biases: removed channels emit 0, nothing needs a carrier; every zero-scale BN channel goes
    kept = {name: nonzero(variables, name) for name in bn_after(result)}
    assert bn_after(result) == kept and result.report["fold"]["carrier_channels"] == 0
    blocks = ["stage1_block0", "stage2_block0", "stage3_block0"]
    # conv1 / conv2 feed only bn2 / bn3; the stage 1 and 2 streams are read whole by the next downsample conv,
    # stage 3's by bn_final alone
    expected = [16]
    for s, block in enumerate(blocks):
        stream = model.widths[4 * s + 3] if s < 2 else kept["bn_final"]
        expected += [kept[f"{block}/bn2"], kept[f"{block}/bn3"], stream, stream]
    assert result.model.widths == tuple(expected)
    selections = dict(zip(list(bn_after(result)), result.model.selections, strict=True))
    for block in blocks:  # bn1 reads its nonzero positions of the full stream, in order
        np.testing.assert_array_equal(selections[f"{block}/bn1"],
                                      np.flatnonzero(bn_scales(variables, f"{block}/bn1")))
    assert selections["bn_final"] is None  # it reads every channel the stream keeps


def densenet_expectation(model, variables):
    """Independent count for DenseNet: a conv output channel stays iff some BN reading it (every later layer
    of its block, the transition or bn_final) has a nonzero scale there."""
    n = (model.depth - 4) // 3
    widths, readers = [], []  # per conv: its output positions in the stream; per BN: (name, stream length)
    stream = [0] * model.widths[0]  # conv index of every stream position
    convs = [model.widths[0]]
    i = 1
    for block in range(3):
        for layer in range(n):
            readers.append((f"block{block + 1}_layer{layer}/bn", list(stream)))
            stream += [i] * model.widths[i]
            convs.append(model.widths[i])
            i += 1
        name = f"transition{block + 1}/bn" if block < 2 else "bn_final"
        readers.append((name, list(stream)))
        if block < 2:
            stream = [i] * model.widths[i]
            convs.append(model.widths[i])
            i += 1
    kept = [np.zeros(w, dtype=bool) for w in convs]
    for name, positions in readers:
        scale = bn_scales(variables, name)
        offsets = {}
        for p, conv in enumerate(positions):
            k = offsets.get(conv, 0)
            kept[conv][k] |= scale[p] != 0
            offsets[conv] = k + 1
    widths = tuple(int(k.sum()) for k in kept)
    return widths, {name: int(np.sum(bn_scales(variables, name) != 0)) for name, _ in readers}


def test_densenet_bns_drop_their_own_zero_channels_and_unread_channels_leave_the_stream():
    model, x = DenseNet(depth=10, growth_rate=6), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(1), zero=0.6)
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    widths, bns = densenet_expectation(model, variables)
    assert result.model.widths == widths and bn_after(result) == bns
    assert result.report["bn_channels_after"] == sum(bns.values()) < result.report["bn_channels_before"]


@pytest.mark.parametrize("name", ["preresnet11", "densenet10"])
def test_positive_biases_fold_exactly_with_carriers_on_the_bn_side(name):
    model = {"preresnet11": PreResNet(depth=11), "densenet10": DenseNet(depth=10, growth_rate=6)}[name]
    x = images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(2), bias_sign=1.0)
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    zeros = sum(b["before"] - nonzero(variables, b["bn"]) for b in result.report["batchnorms"])
    removed = result.report["bn_channels_before"] - result.report["bn_channels_after"]
    assert removed == zeros - result.report["fold"]["carrier_channels"] and removed > 0
    assert result.report["flops_after"] == forward_flops(result.model, result.variables, x.shape[1:])


def test_a_pruned_gathering_model_prunes_again():
    model, x = PreResNet(depth=20), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(3))
    first = prune(model, variables, probe=x)
    names = [b["bn"] for b in first.report["batchnorms"]]
    old = dict(zip(names, first.model.selections, strict=True))
    width = first.model.widths[-1]  # stage 3's stream, read by stage3_block1/bn1 and bn_final
    reads = {name: list(old[name] or range(width)) for name in ("stage3_block1/bn1", "bn_final")}
    p = next(q for q in reads["bn_final"] if q not in reads["stage3_block1/bn1"])  # bn_final's alone
    params = flat(first.variables["params"])
    params[("bn_final", "scale")][reads["bn_final"].index(p)] = 0.0
    again_variables = {"params": traverse_util.unflatten_dict(params),
                       "batch_stats": first.variables["batch_stats"]}
    again = prune(first.model, again_variables, probe=x)
    assert_same_logits(again, first.model, again_variables, x)
    assert again.model.widths[-1] == width - 1  # the stream loses p: nothing reads it any more
    new = dict(zip(names, again.model.selections or (None,) * len(names), strict=True))
    shift = lambda positions: [q - (q > p) for q in positions if q != p]
    assert list(new["stage3_block1/bn1"]) == shift(reads["stage3_block1/bn1"])  # composed indices
    expected_final = shift(reads["bn_final"])
    assert list(new["bn_final"] or range(width - 1)) == expected_final
    assert again.report["bn_channels_after"] == first.report["bn_channels_after"] - 1


class GatherNet(nn.Module):
    """A user's CNN with the `selections` protocol: a residual stream read by two BNs and a concatenation
    read by a third, each of which may gather its input.

        a = conv0(x); r = a + conv2(relu(bn_b(conv1(relu(bn_a(a[sel_a]))))))
        c = concat[r, conv3(relu(bn_s(r[sel_s])))]; logits = dense(mean(relu(bn_u(c[sel_u]))))
    """

    widths: tuple[int, ...] = (8, 6, 8, 5)
    selections: tuple | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        w = self.widths
        sel = self.selections or (None,) * 4
        pick = lambda v, s: v if s is None else v[..., np.asarray(s)]
        bn = functools.partial(nn.BatchNorm, use_running_average=not train)
        a = nn.Conv(w[0], (3, 3), use_bias=False, name="conv0")(x)
        h = nn.relu(bn(name="bn_a")(pick(a, sel[0])))
        h = nn.relu(bn(name="bn_b")(nn.Conv(w[1], (3, 3), use_bias=False, name="conv1")(pick(h, sel[1]))))
        r = a + nn.Conv(w[2], (1, 1), name="conv2")(h)
        d = nn.Conv(w[3], (3, 3), use_bias=False, name="conv3")(nn.relu(bn(name="bn_s")(pick(r, sel[2]))))
        u = nn.relu(bn(name="bn_u")(pick(jnp.concatenate([r, d], axis=-1), sel[3])))
        return nn.Dense(3, name="dense")(u.mean(axis=(1, 2)))


@pytest.mark.parametrize("bias_sign", [-1.0, 1.0])
def test_user_model_with_residual_and_concat_gathers_exactly(bias_sign):
    model, x = GatherNet(), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(4), bias_sign=bias_sign)
    variables = with_zeros(variables, {"bn_a": [0, 1], "bn_s": [1, 2], "bn_u": [0, 2, 9]})
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    assert result.model.selections is not None
    assert result.report["params_after"] < result.report["params_before"]
    if bias_sign < 0:  # nothing to carry: every zero channel goes; the stream keeps what any BN reads
        assert bn_after(result) == {m: nonzero(variables, m) for m in ("bn_a", "bn_b", "bn_s", "bn_u")}
        residual = sum((bn_scales(variables, "bn_a") != 0) | (bn_scales(variables, "bn_s") != 0)
                       | (bn_scales(variables, "bn_u")[:8] != 0))
        assert result.model.widths[0] == result.model.widths[2] == residual
    again = prune(result.model, result.variables, probe=x)  # nothing left to remove: the same model
    assert again.model == result.model


def docstring_example():
    """The example model of palm_jax.pruning's docstring, run from the docstring itself."""
    import textwrap

    import palm_jax.pruning

    doc = palm_jax.pruning.__doc__
    start = doc.index("    class Example(nn.Module):")
    code = textwrap.dedent(doc[start:doc.index("\n\n", doc.index("return nn.Dense", start))])
    scope = {"nn": nn, "np": np, "functools": functools}
    exec(code, scope)  # noqa: S102 (our own docstring)
    return scope["Example"]


def test_the_docstring_example_prunes_per_consumer():
    model, x = docstring_example()(), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(9), bias_sign=1.0)
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    assert result.model.selections is not None and result.model.widths[0] == result.model.widths[2]


class Separable(nn.Module):
    """conv -> BN -> ReLU, a depthwise 3x3 conv (groups = its input channels, `multiplier` outputs each),
    BN -> ReLU, a pointwise conv, BN -> ReLU, a grouped 3x3 conv (2 groups), BN -> ReLU, mean, Dense."""

    widths: tuple[int, ...] = (8, 8, 12, 8)

    @nn.compact
    def __call__(self, x, train: bool):
        w = self.widths
        bn = functools.partial(nn.BatchNorm, use_running_average=not train)
        x = nn.relu(bn()(nn.Conv(w[0], (3, 3), use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(w[1], (3, 3), feature_group_count=x.shape[-1], use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(w[2], (1, 1), use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(w[3], (3, 3), feature_group_count=2, use_bias=False)(x)))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_and_grouped_convs_are_listed_in_widths_and_pruned(multiplier):
    model, x = Separable(widths=(8, 8 * multiplier, 12, 8)), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(5))
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    scale = [bn_scales(variables, f"BatchNorm_{i}") != 0 for i in range(4)]
    # a depthwise input channel goes with its outputs: when its BN and all its outputs' BN are zero
    depthwise = scale[0] | scale[1].reshape(8, multiplier).any(axis=1)
    # a grouped conv (2 groups) keeps both sides per-group equal: position j of every group goes together
    per_group = lambda keep: 2 * int((keep[: len(keep) // 2] | keep[len(keep) // 2:]).sum())
    assert result.model.widths == (depthwise.sum(), depthwise.sum() * multiplier, per_group(scale[2]),
                                   per_group(scale[3]))
    positive = perturbed(init(model, x), np.random.default_rng(5), bias_sign=1.0)
    folded = prune(model, positive, probe=x)  # the padded grouped conv keeps what it cannot carry
    assert_same_logits(folded, model, positive, x)
    assert folded.report["fold"]["blocked"] > 0


class PoolNet(nn.Module):
    """conv -> BN -> ReLU -> zero-padded 3x3 average pool -> 1x1 conv -> BN -> ReLU -> strided padded pool
    -> flatten -> Dense; `include_pad` is Flax's count_include_pad."""

    widths: tuple[int, ...] = (8, 6)
    include_pad: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train)
        pool = functools.partial(nn.avg_pool, padding="SAME", count_include_pad=self.include_pad)
        x = pool(nn.relu(bn()(nn.Conv(self.widths[0], (3, 3), use_bias=False)(x))), (3, 3))
        x = pool(nn.relu(bn()(nn.Conv(self.widths[1], (1, 1))(x))), (3, 3), strides=(2, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("include_pad", [True, False])
def test_zero_padded_average_pools_prune_exactly(include_pad):
    model, x = PoolNet(include_pad=include_pad), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(6), bias_sign=1.0)
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    assert result.report["fold"]["approximate"] == [] and result.model.widths[1] < model.widths[1]
    # count_include_pad=True turns a removed channel's constant into a pattern (lower at the border), which
    # only a carrier reproduces; dividing by the window count (False) leaves a constant that folds
    assert bool(result.report["fold"]["carriers"]) == include_pad
    close = prune(model, variables, probe=x, exact=False)
    assert (close.report["check"]["relative_deviation"] > 1e-4) == include_pad
    assert result.report["flops_after"] == forward_flops(result.model, result.variables, x.shape[1:])


class WidthScaled(nn.Module):
    """Breaks the width protocol: divides an activation by sqrt(widths[0]), so a narrower model differs."""

    widths: tuple[int, ...] = (8, 6)

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train)
        h = nn.relu(bn()(nn.Conv(self.widths[0], (1, 1))(x))) / np.sqrt(self.widths[0])
        h = nn.relu(bn()(nn.Conv(self.widths[1], (1, 1))(h)))
        return nn.Dense(3)(h.mean(axis=(1, 2)))


def test_a_model_that_uses_widths_beyond_shapes_is_refused():
    model, x = WidthScaled(), images(size=8)
    variables = perturbed(init(model, x), np.random.default_rng(7))
    with pytest.raises(ValueError, match=r"BatchNorm_1.*widths beyond shapes.*tolerance="):
        prune(model, variables, probe=x)
    accepted = prune(model, variables, probe=x, exact=False)  # the explicit way to accept a different model
    assert accepted.report["check"]["relative_deviation"] > 1e-2
    assert prune(model, variables, probe=x, tolerance=1.0).model.widths == accepted.model.widths


class Small(nn.Module):
    """Built for 8x8 inputs: its Dense layer reads a flattened 8x8 map."""

    widths: tuple[int, ...] = (4,)

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.widths[0], (3, 3))(x)))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_a_model_built_for_another_input_size_points_at_probe():
    model, x = Small(), images(size=8)
    with pytest.raises(ValueError, match=r"probe batch of shape \(1, 32, 32, 3\).*probe="):
        prune(model, init(model, x))  # the default probe is 32x32


def vgg_flops_ns(depth_cfg, size=32, classes=10) -> int:
    """NS's compute_flops for VGG by hand: convs (2 per multiply-add, padding taps included), BN (2 per
    element), ReLU (1), 2x2 pools (4 per output), the final 2x2 average pool and the linear layer."""
    total, c, hw = 0, 3, size
    for v in depth_cfg:
        if v == "M":
            hw //= 2
            total += 4 * c * hw * hw
            continue
        total += 2 * 9 * c * v * hw * hw + 3 * v * hw * hw
        c = v
    return total + 4 * c * (hw // 2) ** 2 + 2 * c * classes + classes


def test_flops_in_both_conventions():
    from palm_jax.models.vgg import VGG_CFG

    model, x = VGG(depth=19), images(n=1, size=32)
    result = prune(model, init(model, x), probe=x)
    assert result.report["flops_ns_before"] == vgg_flops_ns(VGG_CFG[19]) and round(
        result.report["flops_ns_before"] / 1e8, 2) == 7.97  # NS's Table 1
    assert result.report["flops_before"] == forward_flops(model, init(model, x), (32, 32, 3))  # XLA's: 6.2e8
    user, y = UserNet(kernel=1), images()
    variables = perturbed(init(user, y), np.random.default_rng(8))
    pruned = prune(user, variables, probe=y)
    for key, m, v in [("before", user, variables), ("after", pruned.model, pruned.variables)]:
        assert pruned.report[f"flops_{key}"] == forward_flops(m, v, y.shape[1:])
    assert pruned.report["flops_ns_after"] < pruned.report["flops_ns_before"]


class Looped(nn.Module):
    """conv -> BN -> ReLU -> Dense -> a 3-step loop on the logits (XLA counts a loop's body once)."""

    widths: tuple[int, ...] = (6,)

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.widths[0], (3, 3))(x)))
        y = nn.Dense(3)(h.reshape(h.shape[0], -1))
        return jax.lax.fori_loop(0, 3, lambda i, y: y * 0.5 + 1.0, y)


def test_jits_are_inlined_in_the_pruned_trace_only_where_the_flops_stay_the_same():
    inlinable = lambda f: inlining_keeps_count(jax.make_jaxpr(f)(jnp.ones((2, 3))).jaxpr)
    assert inlinable(lambda x: jax.nn.relu(x) * 2.0)  # relu: a jit of one op
    assert not inlinable(lambda x: jax.jit(lambda y: y * 2.0 + 1.0)(x))  # two ops: summed apart by XLA
    assert not inlinable(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: y * 2.0, x))  # unrolled when inlined
    model, x = Looped(), images(n=1, size=8)
    variables = perturbed(init(model, x), np.random.default_rng(9))
    result = prune(model, variables, probe=x)
    assert_same_logits(result, model, variables, x)
    assert result.model.widths[0] < model.widths[0]
    paths, values, treedef = api._flatten(result.variables)  # the pruned model traced as written
    as_written = flops.count(api.trace(result.model, treedef, values, x), len(values), paths)
    assert result.report["flops_after"] == as_written["xla"]  # (inlined, the loop would count 3 times)


def test_a_bfloat16_model_folds_in_exact_arithmetic():
    model, x = DenseNet(depth=7, growth_rate=4, dtype=jnp.bfloat16), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(10), bias_sign=1.0)
    result = prune(model, variables, probe=x)  # the check runs in float64, rounding aside
    assert result.model.dtype == jnp.bfloat16 and result.report["fold"]["carriers"]
    as_float32 = result._replace(model=result.model.clone(dtype=jnp.float32))
    assert_same_logits(as_float32, model.clone(dtype=jnp.float32), variables, x)
