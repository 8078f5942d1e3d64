"""What the NNX front end knows about Flax's layers: which it resizes, what each reads at call time, and the
BatchNorm that gathers its input.

A layer is resized when its class is exactly one of `RESIZED` (a subclass is the user's own layer, which may
read its channel counts anywhere): its arrays are sliced by the engine and then its feature counts are set
from them (`resize`). Any other module that holds an `nnx.Param` or `nnx.BatchStat` itself keeps its
variables whole (`kept_whole` says why): the engine pins them, and with them every channel they touch.
"""

import numpy as np
from flax import nnx

MODES = ("use_running_average", "deterministic")  # the static flags `Module.eval()` / `.train()` set


class GatherBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` of `x[..., indices]` (Network Slimming's channel_selection before its BN; None: all of
    x). `prune` turns a BatchNorm into one when it keeps other channels than the stream it reads keeps, e.g.
    a BN on a residual stream or a concatenation that other readers need more of."""

    indices: tuple[int, ...] | None = None

    def __call__(self, x, use_running_average=None, *, mask=None):
        if self.indices is not None:
            x = x[..., np.asarray(self.indices)]
        return super().__call__(x, use_running_average, mask=mask)


LAYERS = (nnx.Conv, nnx.Linear)  # whose output width may change
RESIZED = (*LAYERS, nnx.BatchNorm, GatherBatchNorm)
GATHERING = (nnx.BatchNorm, GatherBatchNorm)
NORMALISING = (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)


def kept_whole(module) -> str | None:
    """Why the pruner keeps the variables of `module` (one that holds Params / BatchStats itself) whole, or
    None when it resizes them."""
    kind = type(module)
    if kind is nnx.Conv and module.mask is not None:
        return "a masked nnx.Conv: its mask has the kernel's shape"
    if kind in RESIZED:
        return None
    if kind in NORMALISING:
        return f"nnx.{kind.__name__} normalises over its channels"
    return (f"{kind.__name__} is not a layer the pruner resizes (exactly nnx.Conv, nnx.Linear, "
            "nnx.BatchNorm): it may read its channel counts anywhere")


def resize(model, selections: dict) -> None:
    """Set every resized layer's feature counts from its (sliced) variables, in place, and make the
    BatchNorms of `selections` ({module path: stream positions, or None for all}) gather.

    nnx.Conv reads `in_features`, `feature_group_count` and `kernel_shape` when called: a depthwise conv (one
    input channel per group) keeps its channel multiplier, so its groups follow its outputs; a grouped conv
    keeps its groups (its channels go per group equally)."""
    for path, module in nnx.iter_modules(model):
        kind = type(module)
        if kind is nnx.Conv:
            old, shape = tuple(module.kernel_shape), tuple(module.kernel.shape)
            groups = module.feature_group_count
            if groups > 1 and old[-2] == 1:  # depthwise: groups = outputs / multiplier
                groups = shape[-1] * groups // old[-1]
            module.kernel_shape, module.feature_group_count = shape, groups
            module.in_features, module.out_features = shape[-2] * groups, shape[-1]
        elif kind is nnx.Linear:
            module.in_features, module.out_features = tuple(module.kernel.shape)
        elif kind in GATHERING:
            module.num_features = int(module.mean.shape[0])
        name = path_name(path)
        if name in selections and (selections[name] is not None or kind is GatherBatchNorm):
            module.__class__ = GatherBatchNorm  # the same object, now reading its selected channels
            module.indices = selections[name]


def path_name(path) -> str:
    """An NNX module or state path as the engine names it ("blocks/0/conv", "blocks/0/conv/kernel")."""
    return "/".join(str(part) for part in path)


def named_modules(model) -> dict:
    """{path name: module} of every module in the graph (the root is "")."""
    return {path_name(path): module for path, module in nnx.iter_modules(model)}


def gathers(model) -> dict:
    """{module path: indices} of the model's GatherBatchNorms."""
    return {path_name(path): module.indices for path, module in nnx.iter_modules(model)
            if isinstance(module, GatherBatchNorm)}


def modes(model) -> dict:
    """{module path: {flag: value}} of the `MODES` flags each module has (to rebuild a model as it was)."""
    found = {}
    for path, module in nnx.iter_modules(model):
        flags = {k: getattr(module, k) for k in MODES if isinstance(getattr(module, k, 0), bool | None)}
        if flags:
            found[path_name(path)] = flags
    return found


def set_modes(model, flags: dict) -> None:
    for path, module in nnx.iter_modules(model):
        for key, value in flags.get(path_name(path), {}).items():
            setattr(module, key, value)
