"""Which leaves the proximal transforms act on: the BatchNorm default and the three user mask forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from palm_jax import masks


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x.mean((1, 2)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.blocks = nnx.List([nnx.BatchNorm(4, rngs=rngs)])
        self.head = nnx.Linear(4, 2, rngs=rngs)


def selected_paths(tree, mask=None):
    paths = [masks.leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return {"/".join(p) for p, s in zip(paths, masks.selection(tree, mask), strict=True) if s}


@pytest.fixture(scope="module")
def linen_params():
    variables = jax.eval_shape(LinenNet().init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    return variables["params"]  # shapes are all a mask looks at


def test_default_selects_linen_batchnorm_scales(linen_params):
    assert selected_paths(linen_params) == {"BatchNorm_0/scale"}


def abstract_nnx_state():
    return nnx.state(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))), nnx.Param)


def test_default_selects_nnx_batchnorm_scales_with_and_without_variable_wrappers():
    state = abstract_nnx_state()
    assert selected_paths(state) == {"bn/scale", "blocks/0/scale"}
    assert selected_paths(nnx.as_pure(state)) == {"bn/scale", "blocks/0/scale"}


def test_default_needs_one_dimension_and_the_name_scale():
    tree = {"a": {"scale": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "b": {"scale": jnp.ones(3)},
            "scales": jnp.ones(3)}
    assert selected_paths(tree) == {"b/scale"}


def test_pytree_of_bools_full_and_prefix(linen_params):
    full = jax.tree.map(lambda x: x.ndim == 1, linen_params)
    assert selected_paths(linen_params, full) == {"Conv_0/bias", "BatchNorm_0/scale", "BatchNorm_0/bias",
                                                  "Dense_0/bias"}
    prefix = {"Conv_0": False, "BatchNorm_0": True, "Dense_0": {"kernel": True, "bias": False}}
    assert selected_paths(linen_params, prefix) == {"BatchNorm_0/scale", "BatchNorm_0/bias", "Dense_0/kernel"}


def test_plain_dict_mask_matches_nnx_state():
    state = abstract_nnx_state()
    mask = {"conv": False, "bn": {"scale": True, "bias": False}, "blocks": False, "head": False}
    assert selected_paths(state, mask) == {"bn/scale"}


def test_callable_of_params(linen_params):
    mask = lambda params: jax.tree.map(lambda x: x.ndim == 4, params)
    assert selected_paths(linen_params, mask) == {"Conv_0/kernel"}


def test_callable_of_path_and_leaf(linen_params):
    def mask(path, leaf):
        return masks.leaf_path(path)[0] == "Dense_0" and leaf.ndim == 2

    assert selected_paths(linen_params, mask) == {"Dense_0/kernel"}


def test_select_returns_a_tree_of_bools(linen_params):
    tree = masks.select(linen_params)
    assert tree["BatchNorm_0"]["scale"] is True
    assert tree["Conv_0"]["kernel"] is False


@pytest.mark.parametrize("mask", [
    lambda params: jax.tree.map(lambda _: False, params),
    lambda path, leaf: False,
    {"Conv_0": False, "BatchNorm_0": False, "Dense_0": False},
])
def test_mask_selecting_nothing_is_an_error(linen_params, mask):
    with pytest.raises(ValueError, match="mask"):
        masks.selection(linen_params, mask)


def test_default_on_a_tree_without_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        masks.selection({"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)})


def test_mask_missing_a_leaf_or_holding_non_bools_is_an_error(linen_params):
    with pytest.raises(ValueError, match="mask has no entry for the parameter at 'Dense_0/bias'"):
        masks.selection(linen_params, {"Conv_0": False, "BatchNorm_0": True, "Dense_0": {"kernel": False}})
    with pytest.raises(ValueError, match="mask must hold bools"):
        masks.selection(linen_params, jax.tree.map(lambda x: 1.0, linen_params))
