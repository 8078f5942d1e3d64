"""The train state (params, BN statistics, optimiser state, step, rng) and the optimiser of each method."""

import dataclasses
import functools
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import optax
from flax import struct

from palm_jax import masks, prox
from palm_jax.methods import Method
from palm_jax.train.config import MODELS, TrainConfig
from palm_jax.utils import leaf_path


@dataclasses.dataclass(frozen=True)
class Apply:
    """`model.apply` with value equality: equal models then share compiled steps (jit keys on static fields,
    and bound methods of equal Flax modules compare unequal)."""

    model: Any

    def __call__(self, *args, **kwargs):
        return self.model.apply(*args, **kwargs)


def float32_apply(apply_fn):
    """`apply_fn` computing in float32: an `Apply` of a module with a `dtype` field is cloned to float32;
    anything else is returned as it is."""
    model = getattr(apply_fn, "model", None)
    if isinstance(apply_fn, Apply) and getattr(model, "dtype", jnp.float32) != jnp.float32:
        return Apply(model.clone(dtype=jnp.float32))
    return apply_fn


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes. `rng` is the run's root key: the step derives its augmentation key
    from (rng, step), so a restored state replays the same randomness. `apply_fn` (an `Apply`) and `tx` are
    static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self, params=None) -> dict:
        """Flax variables for `apply_fn`, optionally with other params (e.g. the sparse ones)."""
        return {"params": self.params if params is None else params, "batch_stats": self.batch_stats}

    def checkpoint_tree(self) -> dict:
        """The arrays a checkpoint holds, as nested dicts (no NamedTuples, so Orbax stores them plainly)."""
        fields = ("step", "params", "batch_stats", "opt_state", "rng")
        return {name: flax.serialization.to_state_dict(getattr(self, name)) for name in fields}

    def from_checkpoint_tree(self, tree: dict) -> "TrainState":
        """This state with every array replaced by the one in `tree` (same structure as `checkpoint_tree`)."""
        restored = {
            name: flax.serialization.from_state_dict(getattr(self, name), tree[name]) for name in tree
        }
        return self.replace(**restored)


def build_model(cfg: TrainConfig, num_classes: int, widths=None):
    """The Linen module that `cfg` names, computing in `cfg.dtype` (parameters stay float32)."""
    widths = cfg.widths if widths is None else widths
    extra = {"growth_rate": cfg.growth_rate} if cfg.model == "densenet" else {}
    return MODELS[cfg.model](depth=cfg.depth, num_classes=num_classes, widths=widths, dtype=cfg.compute_dtype,
                             **extra)


def lr_schedule(lr: float, total_steps: int, drops=(0.5, 0.75), warmup_steps: int = 0) -> optax.Schedule:
    """`lr` divided by 10 at each fraction of `total_steps` in `drops` (the NS recipe: 50% and 75%); with
    `warmup_steps`, step s < warmup_steps uses lr * (s + 1) / warmup_steps instead."""
    stepped = optax.piecewise_constant_schedule(lr, {int(total_steps * f): 0.1 for f in drops})
    if not warmup_steps:
        return stepped
    return lambda step: stepped(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)


def schedule_of(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate of `cfg` (one phase's config) per step, for epochs of `steps_per_epoch` steps."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return _schedule(cfg.lr, cfg.epochs * steps_per_epoch, cfg.lr_drops, warmup)


_schedule = functools.cache(lr_schedule)  # equal arguments, the same schedule: runs share compiled steps


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and weight decay (on every parameter, as in NS) plus the method's sparsity links
    (`Method.optimizer_links`), for `cfg` (one phase's config):

    prox:     decay -> sgd -> palm_prox(l1, beta)     (PALM; xi in the optimiser state holds the exact zeros)
    ista:     decay -> sgd -> soft_threshold(l1)      (proximal SGD on the scales)
    ns:       l1_subgradient(l1) -> decay -> sgd      (Network Slimming's subgradient)
    baseline: decay -> sgd

    Equal arguments give the same (cached) object, so runs in one process share compiled steps.
    """
    schedule = schedule_of(cfg, steps_per_epoch)
    return _optimizer(cfg.method, cfg.l1, cfg.beta, schedule, cfg.momentum, cfg.weight_decay, cfg.xi_init,
                      cfg.seed)


@functools.cache
def _optimizer(method, l1, beta, schedule, momentum, weight_decay, xi_init, seed):
    before, after = method.optimizer_links(l1, beta, schedule, xi_init=xi_init, xi_seed=seed)
    sgd = [optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum)]
    return optax.chain(*before, *sgd, *after)


def init_variables(model, seed: int, image_shape) -> dict:
    """Fresh variables for `model` on inputs of `image_shape` (H, W, C), from `seed`.

    One compiled program with an "rbg" key: XLA:CPU takes tens of seconds to compile Flax's initialisers
    on threefry keys, a few seconds on rbg keys (the run's data and augmentation keys stay threefry).
    """
    return _init_fn(model, tuple(image_shape))(jax.random.key(seed, impl="rbg"))


@functools.cache
def _init_fn(model, image_shape):
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))


def create_train_state(model, tx, variables: dict, seed: int) -> TrainState:
    """Step 0 of a run: optimiser state initialised from `variables["params"]`, root key from `seed`.

    The arrays are copied: the train step donates the state's buffers, and `variables` stays usable.
    """
    params, batch_stats = jax.tree.map(jnp.copy, (variables["params"], variables.get("batch_stats", {})))
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        apply_fn=Apply(model),
        tx=tx,
    )


def sparse_params(state: TrainState, method: Method):
    """The params whose BN scales carry the method's exact zeros: xi when the method keeps it, else the
    params themselves."""
    return prox.sparse_scales(state.params, state.opt_state) if Method(method).keeps_xi else state.params


def scale_leaves(params) -> list[tuple[str, jax.Array]]:
    """(layer path, scale vector) of every BatchNorm scale in `params`, in tree order."""
    with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    selected = masks.selection(params)
    return [
        ("/".join(leaf_path(path)[:-1]), leaf)
        for (path, leaf), keep in zip(with_paths, selected, strict=True)
        if keep
    ]


def zero_fraction(params) -> jax.Array:
    """Fraction of all BatchNorm scale entries in `params` that are exactly 0.0."""
    scales = [leaf for _, leaf in scale_leaves(params)]
    zeros = sum(jnp.sum(s == 0) for s in scales)
    return zeros / sum(s.size for s in scales)
