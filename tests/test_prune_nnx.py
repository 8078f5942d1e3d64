"""palm_jax.prune on Flax NNX modules written only for these tests: pruned outputs equal the sparse model's,
layers the pruner cannot resize are left alone and reported, the pruned module trains and round-trips through
save / load in a fresh process, the input module is left unchanged."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import palm_jax
from palm_jax.pruning import load_pruned, prune, save_pruned
from palm_jax.pruning.nnx_layers import GatherBatchNorm

O0 = {"xla_backend_optimization_level": 0}  # programs that run once here: compile fast


class Block(nnx.Module):
    """relu(bn(conv(x))) with a 3x3 zero-padded conv."""

    def __init__(self, cin, cout, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class Net(nnx.Module):
    """A residual add, a depthwise-separable block, a concatenation, padded pools and a Dense head after a
    flatten:

        a = conv0(x); s = a + conv2(blocks[0](relu(bn0(a))))                       (residual stream, 8)
        d = pw(relu(bn_dw(dw(relu(bn_s(s))))))              (depthwise 3x3, multiplier 2, then 1x1)
        u = avg_pool(relu(bn_u(concat[s, d])), 3, stride 2, SAME, count_include_pad=include_pad)
        logits = head(flatten(max_pool(u, 3, stride 2, SAME)))
    """

    def __init__(self, include_pad=True, num_classes=4, *, rngs):
        self.include_pad = include_pad
        self.conv0 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([Block(8, 6, rngs=rngs)])
        self.conv2 = nnx.Conv(6, 8, (1, 1), rngs=rngs)
        self.bn_s = nnx.BatchNorm(8, rngs=rngs)
        self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs)
        self.bn_dw = nnx.BatchNorm(16, rngs=rngs)
        self.pw = nnx.Conv(16, 6, (1, 1), use_bias=False, rngs=rngs)
        self.bn_u = nnx.BatchNorm(14, rngs=rngs)
        self.head = nnx.Linear(14 * 2 * 2, num_classes, rngs=rngs)

    def __call__(self, x):
        a = self.conv0(x)
        s = a + self.conv2(self.blocks[0](nnx.relu(self.bn0(a))))
        d = self.pw(nnx.relu(self.bn_dw(self.dw(nnx.relu(self.bn_s(s))))))
        u = nnx.relu(self.bn_u(jnp.concatenate([s, d], axis=-1)))
        u = nnx.avg_pool(u, (3, 3), (2, 2), padding="SAME", count_include_pad=self.include_pad)
        u = nnx.max_pool(u, (3, 3), (2, 2), padding="SAME")
        return self.head(u.reshape(u.shape[0], -1))


class ChannelScale(nnx.Module):
    """A user's layer: the pruner does not know which of its attributes hold channel counts."""

    def __init__(self, n):
        self.gamma = nnx.Param(jnp.linspace(0.5, 1.5, n))

    def __call__(self, x):
        return x * self.gamma[...]


class Offset(nnx.Variable):
    """A user's Variable type (neither a Param nor a BatchStat)."""


class Custom(nnx.Module):
    """conv0 -> bn0 (resized); conv1 -> ChannelScale -> bn1 and conv2 + Offset -> bn2 (kept); Dropout."""

    def __init__(self, *, rngs):
        self.conv0 = nnx.Conv(3, 6, (1, 1), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(6, rngs=rngs)
        self.conv1 = nnx.Conv(6, 6, (1, 1), use_bias=False, rngs=rngs)
        self.scale = ChannelScale(6)
        self.bn1 = nnx.BatchNorm(6, rngs=rngs)
        self.conv2 = nnx.Conv(6, 6, (1, 1), use_bias=False, rngs=rngs)
        self.offset = Offset(jnp.full((6,), 0.1))
        self.bn2 = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = nnx.relu(self.bn1(self.scale(self.conv1(h))))
        h = nnx.relu(self.bn2(self.conv2(h) + self.offset[...]))
        return self.head(self.drop(h).mean(axis=(1, 2)))


class ReadsWidth(nnx.Module):
    """Computes with its channel count: no pruned model can equal it."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 6, (1, 1), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv(x)))
        return self.head(h.mean(axis=(1, 2))) * h.shape[-1]


class Grouped(nnx.Module):
    """An nnx.Sequential stem with a BatchNorm without bias, then a grouped conv (2 groups)."""

    def __init__(self, *, rngs):
        self.stem = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=rngs),
                                   nnx.BatchNorm(8, use_bias=False, rngs=rngs), nnx.relu)
        self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.grouped(self.stem(x)))).mean(axis=(1, 2)))


def images(n=4, size=8, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def sparsify(model, seed=0, *, zero=0.5, bias_sign=-1.0):
    """Random BN scales, a `zero` fraction of each BN's exactly 0, biases of sign `bias_sign`, running
    statistics away from 0 / 1 (in place)."""
    rng = np.random.default_rng(seed)
    for _, bn in nnx.iter_modules(model):
        if isinstance(bn, nnx.BatchNorm):
            n = bn.num_features
            scale = rng.uniform(0.2, 1.0, n)
            scale[rng.choice(n, int(round(n * zero)), replace=False)] = 0.0
            bn.scale[...] = jnp.asarray(scale, jnp.float32)
            bn.bias[...] = jnp.asarray(bias_sign * rng.uniform(0.0, 0.3, n), jnp.float32)
            bn.mean[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    return model


def logits(model, x):
    """Eval-mode outputs of a copy, full float32 precision, compiled without backend optimisations."""
    copy = nnx.clone(model)
    copy.eval()
    graphdef, state = nnx.split(copy)
    with jax.default_matmul_precision("highest"):
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile(O0)
        return np.asarray(forward(state, x))


def assert_equal_outputs(pruned, sparse, x):
    got, want = logits(pruned, x), logits(sparse, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def snapshot(model):
    return nnx.graphdef(model), jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def assert_unchanged(model, before):
    graphdef, values = snapshot(model)
    assert graphdef == before[0]
    jax.tree.map(np.testing.assert_array_equal, values, before[1])


def widths(model) -> dict:
    """Output channels of every conv and Dense layer, by module path."""
    return {"/".join(map(str, path)): layer.kernel.shape[-1] for path, layer in nnx.iter_modules(model)
            if isinstance(layer, nnx.Conv | nnx.Linear)}


def batchnorms(model) -> dict:
    return {"/".join(map(str, path)): bn for path, bn in nnx.iter_modules(model)
            if isinstance(bn, nnx.BatchNorm)}


@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("bias_sign", [-1.0, 1.0])
def test_pruned_module_equals_the_sparse_one(include_pad, bias_sign):
    model, x = sparsify(Net(include_pad, rngs=nnx.Rngs(0)), seed=3, bias_sign=bias_sign), images()
    before = snapshot(model)
    result = prune(model, probe=x)
    assert_unchanged(model, before)  # nothing of the input module changes, its mode flags included
    assert type(result.model) is Net and result.model.bn0.use_running_average is False
    assert_equal_outputs(result.model, model, x)
    assert result.report["check"]["relative_deviation"] <= 1e-5 and result.report["left_alone"] == []
    assert result.report["params_after"] < result.report["params_before"]
    assert result.report["flops_after"] < result.report["flops_before"]
    assert result.variables == nnx.state(result.model)
    scale = lambda name: np.asarray(getattr(model, name).scale[...])
    pruned = result.model
    # the depthwise conv keeps its multiplier 2: two outputs per kept input channel, one group each
    dw = pruned.dw
    assert dw.kernel.shape[-2:] == (1, dw.out_features) == (1, 2 * dw.feature_group_count)
    assert pruned.dw.in_features == pruned.dw.feature_group_count < 8
    assert pruned.head.in_features == pruned.head.kernel.shape[0] == 4 * pruned.bn_u.num_features
    # bn_s reads the residual stream, which bn_u and the blocks' readers need more of: it gathers its own
    assert isinstance(pruned.bn_s, GatherBatchNorm) and pruned.bn_s.indices is not None
    if bias_sign < 0:  # removed channels emit 0: every zero-scale BN channel goes, nothing carries
        assert result.report["fold"]["carrier_channels"] == 0
        expected = {name: np.count_nonzero(bn.scale[...]) for name, bn in batchnorms(model).items()}
        # bn_s's channel c feeds the depthwise conv's outputs 2c, 2c + 1: it stays while bn_dw keeps either
        stays = (scale("bn_s") != 0) | (scale("bn_dw") != 0).reshape(8, 2).any(axis=1)
        expected["bn_s"] = np.count_nonzero(stays)
        assert {b["bn"]: b["after"] for b in result.report["batchnorms"]} == expected
        np.testing.assert_array_equal(pruned.bn_s.scale[...], scale("bn_s")[stays])
    else:  # relu(bias) > 0 read through zero padding and the padded pool: carried exactly
        assert result.report["fold"]["carrier_channels"] > 0


def test_a_grouped_conv_keeps_its_groups():
    model, x = Grouped(rngs=nnx.Rngs(0)), images()
    for bn in (model.stem.layers[1], model.bn):
        bn.scale[...] = jnp.asarray([0, 0, 0.5, 0.7, 0, 0, 0.9, 0.3], jnp.float32)
    result = prune(model, probe=x)
    assert_equal_outputs(result.model, model, x)
    grouped = result.model.grouped
    # kernel position k reads input k of both groups: inputs 0, 1 and 4, 5 go together (and outputs too)
    assert grouped.kernel.shape == (3, 3, 2, 4) and grouped.feature_group_count == 2
    assert grouped.in_features == grouped.out_features == 4 == result.model.bn.num_features


def test_layers_it_cannot_resize_are_left_alone_and_reported(tmp_path):
    model, x = sparsify(Custom(rngs=nnx.Rngs(0)), seed=1, bias_sign=1.0), images()
    result = prune(model, probe=x)
    assert_equal_outputs(result.model, model, x)
    assert widths(result.model) == {"conv0": np.count_nonzero(model.bn0.scale[...]), "conv1": 6, "conv2": 6,
                                    "head": 3}
    assert result.model.scale.gamma.shape == (6,) and result.model.offset.shape == (6,)
    left = {item["module"]: item for item in result.report["left_alone"]}
    assert set(left) == {"scale", "offset"}  # the Dropout's RNG state touches no channel: not listed
    assert left["scale"]["class"] == "ChannelScale" and "not a layer the pruner" in left["scale"]["why"]
    assert left["offset"]["class"] == "Offset" and "constant" in left["offset"]["why"]
    zeros = int(np.sum(model.bn1.scale[...] == 0) + np.sum(model.bn2.scale[...] == 0))
    assert result.report["kept_meeting_criterion"] >= zeros > 0
    save_pruned(tmp_path / "custom", result)  # its own Variable type and the Dropout's RNG state included
    loaded = load_pruned(tmp_path / "custom")
    assert nnx.graphdef(loaded.model) == nnx.graphdef(result.model)
    np.testing.assert_array_equal(logits(loaded.model, x), logits(result.model, x))
    np.testing.assert_array_equal(jax.random.key_data(loaded.model.drop.rngs.key[...]),
                                  jax.random.key_data(result.model.drop.rngs.key[...]))


def test_a_pruned_module_trains_with_palm_prox_and_prunes_again():
    x, labels = images(n=8), jnp.arange(8) % 4
    first = prune(sparsify(Net(rngs=nnx.Rngs(0)), seed=2), probe=x)
    model = first.model
    model.train()
    tx = optax.chain(optax.sgd(0.05, momentum=0.9),
                     palm_jax.palm_prox(l1=0.5, beta=100.0, learning_rate=0.05))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    nnx.update(model, palm_jax.sparse_scales(nnx.state(model, nnx.Param), optimizer.opt_state))
    bn = model.blocks[0].bn  # one more channel to remove: scale 0, relu(bias) = 0
    bn.scale[...], bn.bias[...] = bn.scale[...].at[0].set(0.0), bn.bias[...].at[0].set(-1.0)
    again = prune(model, probe=x)  # GatherBatchNorms in the traced module: their selections compose
    assert again.model.blocks[0].conv.out_features < model.blocks[0].conv.out_features
    assert_equal_outputs(again.model, model, x)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from flax import nnx
    import palm_jax

    result = palm_jax.load_pruned(sys.argv[1])
    assert type(result.model).__module__ == "test_prune_nnx"
    model = nnx.clone(result.model)
    model.eval()
    np.save(sys.argv[3], np.asarray(nnx.jit(lambda m, x: m(x))(model, np.load(sys.argv[2]))))
    """
)


def test_save_and_load_in_a_fresh_process(tmp_path):
    x = images()
    result = prune(sparsify(Net(False, 5, rngs=nnx.Rngs(0)), seed=4), probe=x)
    with pytest.raises(ValueError, match="constructor=functools.partial"):  # Net() would have 4 classes
        save_pruned(tmp_path / "default", result)
    assert not (tmp_path / "default").exists()
    save_pruned(tmp_path / "net", result, constructor=functools.partial(Net, False, num_classes=5))
    meta = json.loads((tmp_path / "net" / "pruned_model.json").read_text())
    assert meta["kind"] == "nnx" and meta["module"] == "test_prune_nnx:Net" and meta["gathers"]
    np.save(tmp_path / "x.npy", np.asarray(x))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "net"), str(tmp_path / "x.npy"),
         str(tmp_path / "out.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), logits(result.model, x), atol=1e-5, rtol=0)

    loaded = load_pruned(tmp_path / "net")
    assert nnx.graphdef(loaded.model) == nnx.graphdef(result.model)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(loaded.variables),
                 nnx.to_pure_dict(nnx.state(result.model)))
    meta["shapes"]["bn0/scale"] = [7]
    (tmp_path / "net" / "pruned_model.json").write_text(json.dumps(meta))
    with pytest.raises(palm_jax.PrunedCheckpointError, match="do not fit"):
        load_pruned(tmp_path / "net")


class NoBatchNorm(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 4, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.conv(x).mean(axis=(1, 2))


def test_bad_input_names_the_fix():
    model, x = sparsify(Net(rngs=nnx.Rngs(0))), images()
    with pytest.raises(ValueError, match="needs probe="):
        prune(model)
    with pytest.raises(ValueError, match="probe"):
        prune(model, probe=jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="percent"):
        prune(model, probe=x, percent=100)
    with pytest.raises(ValueError, match="no nnx.BatchNorm"):
        prune(NoBatchNorm(rngs=nnx.Rngs(0)), probe=x)
    with pytest.raises(ValueError, match="not a state of this Net"):
        prune(model, {"nothing": {"here": jnp.ones(2)}}, probe=x)
    reads = sparsify(ReadsWidth(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="differs from the model with the removed scales at zero"):
        prune(reads, probe=x)


def test_variables_are_written_into_a_copy_first():
    model, x = Net(rngs=nnx.Rngs(0)), images()
    sparse = sparsify(nnx.clone(model), seed=5)
    before = snapshot(model)
    result = prune(model, nnx.state(sparse, nnx.Param), probe=x)
    assert_unchanged(model, before)
    nnx.update(model, nnx.state(sparse, nnx.Param))
    assert_equal_outputs(result.model, model, x)
    assert result.report["params_after"] < result.report["params_before"]


def test_the_nnx_example_runs():
    path = Path(__file__).resolve().parents[1] / "experiments" / "nnx_prune.py"
    spec = importlib.util.spec_from_file_location("nnx_prune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.run(steps=30, l1=8.0, finetune_steps=5, verbose=False)  # a large l1: channels reach 0 fast
    report, (before, after) = out["report"], out["params"]
    assert out["zeros"] > 0 and report["params_after"] < report["params_before"]
    assert out["deviation"] <= 1e-5 and out["accuracy"]["pruned"] == out["accuracy"]["sparse"]
    assert type(out["model"]) is example.SmallNet and set(before) == set(after)
    assert after["head/kernel"][0] < before["head/kernel"][0]
    assert np.all(np.isfinite(out["finetune_losses"]))
