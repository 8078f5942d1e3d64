"""Re-estimate the BatchNorm running statistics of a network from data ("precise BN"): no gradient, no weight.

After pruning (scales swapped for xi, or cut by a percentile) every later BatchNorm still normalises with
running statistics gathered for the old network. `recalibrate_bn` replaces them by exact averages over
batches of training images, so the result does not depend on the old statistics at all:

    variables = palm_jax.recalibrate_bn(model, variables, train_images_uint8, batch_size=64,
                                        preprocess=palm_jax.data.normalize)

What is estimated. The model runs as at evaluation (Linen `train=False`, NNX `eval()`: dropout off) except
that every BatchNorm normalises with the statistics of its batch, as in training. For one BN, with `x_b` its
input on batch b (B batches of equal size; every axis but the feature axis reduced), in float32 or wider:

    mu_b = mean(x_b),   v_b = mean((x_b - mu_b)^2)                (biased, Flax's convention)
    mean = 1/B sum_b mu_b                                          (the mean over all images)
    var  = 1/B sum_b v_b + 1/B sum_b (mu_b - mean)^2               (the variance over all images)

The variance over all images, not the mean of the per-batch variances: in training a BN's normalised output
has mean 0 and variance 1 per channel within every batch, so also over all the images; with these statistics
the eval-mode output of the first BN has exactly that mean and variance over the same images (up to
epsilon), and a later BN's nearly so. The mean of the `v_b` alone is smaller by the spread of the batch means,
about `var / batch_size` for random batches, and would scale every eval-mode output up by that much. These are
the population statistics of PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021,
arXiv:2105.07576). Dropout is off because evaluation runs without it: the statistics are those of the inputs
the BNs see at evaluation (Li et al., "Understanding the Disharmony between Dropout and Batch Normalization
by Variance Shift", CVPR 2019).

Batches are consecutive slices of `images` in the order given (shuffle sorted images first): the first
`num_batches` full batches of `batch_size` (default: all of them). The remainder, `len(images) % batch_size`
images, is not used, so that every batch has one shape: one trace and one compilation per call, all batches
in one `lax.scan`. Use the training batch size, so that each BN normalises its batch as in training, and the
images as at evaluation (no augmentation).
"""

import operator
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze
from flax.errors import FlaxError

Moments = tuple[jax.Array, jax.Array]  # per-channel mean and biased variance of one BN on one batch


def recalibrate_bn(
    model,
    variables,
    images,
    *,
    batch_size: int = 64,
    num_batches: int | None = None,
    preprocess: Callable | None = None,
):
    """`variables` with every BatchNorm's running mean and variance re-estimated from `images` (see the
    module docstring for the equations); parameters and every other leaf are returned as they are.

    model:       a Flax Linen module called as `model.apply(variables, x, train=False)`, with `nn.BatchNorm`
                 (or subclasses) anywhere, in submodules too; or an NNX module called as `model(x)`, with
                 `nnx.BatchNorm` anywhere.
    variables:   Linen: the variables dict (`{"params": ..., "batch_stats": ...}`, FrozenDict or dict).
                 NNX: None (the module's own state) or an `nnx.State`, whole or partial (e.g. sparse params),
                 applied onto a copy of the module first.
    images:      [N, ...] with the examples on the first axis, as the model takes them (NHWC for a CNN):
                 normalised floats, or any dtype together with `preprocess`.
    batch_size:  images per batch (the training batch size); at most N.
    num_batches: use the first `num_batches` full batches (default: all, N // batch_size).
    preprocess:  applied to every batch inside the compiled function, e.g. `palm_jax.data.normalize` for uint8
                 images.

    Returns, for Linen, the variables (same container type) with `batch_stats[path]["mean"]` and `["var"]`
    replaced for every BatchNorm called in the forward pass, in their stored dtype; entries of `batch_stats`
    that no BatchNorm call owns are kept. For NNX, a new module (`nnx.clone` of `model`) with the recalibrated
    statistics; `model` is unchanged (`nnx.state(result)` gives the state, `nnx.update(model, ...)` applies it
    in place). No gradient is taken and no weight changes: this is not fine-tuning.

    Raises ValueError (one line) for empty images, images without a batch axis or of a shape the model does
    not take, a uint8 array without `preprocess`, a `batch_size` larger than the images, a model without
    BatchNorm, a Linen BatchNorm called more than once per forward pass or with a `mask`, and an NNX BatchNorm
    that does not normalise with batch statistics when `use_running_average=False` is set on it.
    Not supported: an NNX BatchNorm called more than once per forward pass (its last call's statistics are
    kept), BNs with an `axis_name` (pmap / shard_map), Linen BNs inside lifted transforms (nn.scan, nn.vmap).
    """
    batches = _batches(images, batch_size, num_batches, preprocess)
    if isinstance(model, nnx.Module):
        return _recalibrate_nnx(model, variables, batches, preprocess)
    if isinstance(model, nn.Module):
        return _recalibrate_linen(model, variables, batches, preprocess)
    raise ValueError(f"recalibrate_bn: model must be a Flax Linen or NNX module, got {type(model).__name__}")


def _batches(images, batch_size, num_batches, preprocess) -> jax.Array:
    """The images used, as one device array [num_batches, batch_size, ...], after checking the arguments."""
    if not (hasattr(images, "shape") and hasattr(images, "dtype")):
        images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(
            f"recalibrate_bn: images must be an array [N, ...] with the examples on the first axis (NHWC for "
            f"a CNN), got shape {tuple(images.shape)}"
        )
    n = images.shape[0]
    if n == 0:
        raise ValueError("recalibrate_bn: images is empty; pass at least batch_size training images")
    batch_size = _positive_int(batch_size, "batch_size")
    if batch_size > n:
        raise ValueError(
            f"recalibrate_bn: batch_size {batch_size} is larger than the {n} images; pass more images or a "
            "smaller batch_size"
        )
    available = n // batch_size
    num_batches = available if num_batches is None else _positive_int(num_batches, "num_batches")
    if num_batches > available:
        raise ValueError(
            f"recalibrate_bn: num_batches {num_batches} exceeds the {available} full batches of {batch_size} "
            f"in {n} images; pass more images or fewer batches"
        )
    if preprocess is None and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"recalibrate_bn: images are {images.dtype}; pass normalised floats, or preprocess= (e.g. "
            "palm_jax.data.normalize for uint8 images)"
        )
    used = jnp.asarray(images[: num_batches * batch_size])
    return used.reshape(num_batches, batch_size, *images.shape[1:])


def _positive_int(value, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"recalibrate_bn: {name} must be an int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"recalibrate_bn: {name} must be >= 1, got {value}")
    return value


def _per_batch_moments(batch_moments: Callable, state, batches: jax.Array, preprocess, call: str):
    """`batch_moments(state, x) -> tuple of Moments` (one per BN) on every batch, traced and compiled once;
    returned as float64 NumPy arrays stacked over the batches. `call` names the forward pass in errors."""
    prepare = preprocess if preprocess is not None else (lambda x: x)

    def step(state, batch):  # state carried unchanged: NNX variables merged from it belong to this trace
        return state, batch_moments(state, prepare(batch))

    def run(state, batches):
        return jax.lax.scan(step, state, batches)[1]

    try:
        traced = jax.jit(run).trace(state, batches)
    except (TypeError, FlaxError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"recalibrate_bn: {call} fails on a batch of shape {tuple(batches.shape[1:])}: {first_line}"
        ) from err
    per_batch = traced.lower().compile()(state, batches)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), per_batch)


def _population(means: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over all images from the moments of B equal-size batches (law of total variance):
    mean = mean_b(mu_b), var = mean_b(v_b) + var_b(mu_b)."""
    return means.mean(axis=0), variances.mean(axis=0) + means.var(axis=0)


def _moments(x, axis) -> Moments:
    """Per-channel mean and biased variance (two-pass, at least float32) over every axis but `axis`."""
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    features = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    reduced = tuple(i for i in range(x.ndim) if i not in features)
    mean = x.mean(reduced, keepdims=True)
    return jnp.squeeze(mean, reduced), jnp.square(x - mean).mean(reduced)


def _check_output(out, batch_size: int, call: str) -> None:
    leaves = jax.tree.leaves(out)
    if not leaves or any(jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch_size for leaf in leaves):
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        raise ValueError(
            f"recalibrate_bn: {call} on a batch of {batch_size} gives outputs of shapes {shapes}, not "
            f"{batch_size} examples: images must be [N, ...] with the examples on the first axis"
        )


def _no_batchnorm(kind: str) -> ValueError:
    return ValueError(f"recalibrate_bn: the model calls no {kind} in its forward pass")


def _recalibrate_linen(model: nn.Module, variables, batches: jax.Array, preprocess):
    """Each `nn.BatchNorm.__call__` is intercepted (`nn.intercept_methods`): its input's moments are recorded
    under its scope path and it runs with `use_running_average=False` (its updates of `batch_stats`, an
    exponential moving average, are discarded)."""
    call = "model.apply(variables, x, train=False)"
    paths = []  # the BNs' scope paths, in call order, filled while tracing

    def batch_moments(variables, x):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm):
                return next_fun(*args, **kwargs)
            kwargs = dict(kwargs)
            inputs = kwargs.pop("x") if "x" in kwargs else args[0]
            kwargs.pop("use_running_average", None)  # also when given positionally: args[1:] is dropped
            where = "/".join(module.scope.path)
            if kwargs.get("mask") is not None:
                raise ValueError(f"recalibrate_bn: the BatchNorm {where} is called with a mask (unsupported)")
            if module.scope.path in captured:
                raise ValueError(
                    f"recalibrate_bn: the BatchNorm {where} is called more than once per forward pass; its "
                    "running statistics would be ambiguous"
                )
            captured[module.scope.path] = _moments(inputs, module.axis)
            # batch statistics whatever the module was built with (`use_running_average=not train` and
            # train=False, typically): this call's transient module instance is switched for the call only
            built_with = module.use_running_average
            object.__setattr__(module, "use_running_average", False)
            try:
                return next_fun(inputs, **kwargs)
            finally:
                object.__setattr__(module, "use_running_average", built_with)

        with nn.intercept_methods(interceptor):
            out, _ = model.apply(variables, x, train=False, mutable=["batch_stats"])
        _check_output(out, x.shape[0], call)
        if not captured:
            raise _no_batchnorm("nn.BatchNorm")
        stored = traverse_util.flatten_dict(unfreeze(variables.get("batch_stats", {})))
        for path, moments in captured.items():
            for name, value in zip(("mean", "var"), moments, strict=True):
                leaf = stored.get((*path, name))
                if leaf is None or leaf.shape != value.shape:
                    raise ValueError(
                        f"recalibrate_bn: the BatchNorm {'/'.join(path)} has no running {name} of shape "
                        f"{value.shape} in variables['batch_stats'] (BNs in lifted transforms such as "
                        "nn.scan are not supported)"
                    )
        paths[:] = captured
        return tuple(captured.values())

    per_batch = _per_batch_moments(batch_moments, variables, batches, preprocess, call)
    stats = traverse_util.flatten_dict(unfreeze(variables["batch_stats"]))
    for path, (means, variances) in zip(paths, per_batch, strict=True):
        for name, value in zip(("mean", "var"), _population(means, variances), strict=True):
            stats[(*path, name)] = jnp.asarray(value, stats[(*path, name)].dtype)
    stats = traverse_util.unflatten_dict(stats)
    if isinstance(variables, FrozenDict):
        return variables.copy({"batch_stats": freeze(stats)})
    return {**variables, "batch_stats": stats}


def _recalibrate_nnx(model: nnx.Module, variables, batches: jax.Array, preprocess):
    """On a merged copy in eval mode, every `nnx.BatchNorm` gets `use_running_average=False`, `momentum=0`
    and `use_fast_variance=False`: after one call its `mean` and `var` are exactly the batch's moments
    (two-pass, float32). `var` starts at -1, so a BN that did not normalise with batch statistics is seen."""
    call = "model(x)"
    recalibrated = nnx.clone(model)
    if variables is not None:
        try:
            nnx.update(recalibrated, variables)
        except (TypeError, ValueError, KeyError, FlaxError) as err:
            raise ValueError(f"recalibrate_bn: variables is not a state of this module: {err}") from err
    graphdef, state = nnx.split(recalibrated)
    paths = []

    def batch_moments(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        norms = [(path, bn) for path, bn in nnx.iter_modules(copy) if isinstance(bn, nnx.BatchNorm)]
        if not norms:
            raise _no_batchnorm("nnx.BatchNorm")
        for _, bn in norms:
            bn.use_running_average, bn.momentum, bn.use_fast_variance = False, 0.0, False
            bn.mean[...] = jnp.zeros_like(bn.mean[...])
            bn.var[...] = jnp.full_like(bn.var[...], -1.0)
        _check_output(copy(x), x.shape[0], call)
        paths[:] = [path for path, _ in norms]
        return tuple((bn.mean[...], bn.var[...]) for _, bn in norms)

    per_batch = _per_batch_moments(batch_moments, state, batches, preprocess, call)
    norms = dict(nnx.iter_modules(recalibrated))
    for path, (means, variances) in zip(paths, per_batch, strict=True):
        if (variances < 0).any():
            raise ValueError(
                f"recalibrate_bn: the nnx.BatchNorm {'/'.join(map(str, path))} did not normalise with batch "
                "statistics in model(x) (not called, or called with use_running_average=True)"
            )
        bn = norms[path]
        mean, var = _population(means, variances)
        bn.mean[...] = jnp.asarray(mean, bn.mean[...].dtype)
        bn.var[...] = jnp.asarray(var, bn.var[...].dtype)
    return recalibrated
