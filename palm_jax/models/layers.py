"""Layer factories and initialisers shared by the Network Slimming CNNs.

Initialisation follows Network Slimming (Liu et al., ICCV 2017, reference PyTorch code):

    conv kernel ~ N(0, 2 / (k * k * out_channels))   (He normal over fan-out, untruncated)
    BN scale = 0.5, BN bias = 0
    Dense kernel ~ N(0, 0.01^2), Dense bias = 0

BatchNorm uses PyTorch's defaults (momentum 0.1 there, i.e. 0.9 here; epsilon 1e-5). `dtype` is the compute
dtype; parameters are always float32.
"""

import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
bn_scale_init = nn.initializers.constant(0.5)
dense_kernel_init = nn.initializers.normal(stddev=0.01)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(features: int, kernel_size: int, *, stride: int = 1, name: str, dtype=jnp.float32) -> nn.Conv:
    """A bias-free square conv with PyTorch's symmetric padding `kernel_size // 2`."""
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def batch_norm(train: bool, *, name: str, dtype=jnp.float32) -> nn.BatchNorm:
    """BatchNorm over the channel (last) axis; batch statistics in train mode, running averages otherwise."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        scale_init=bn_scale_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, *, name: str, dtype=jnp.float32) -> nn.Dense:
    """The classifier layer."""
    return nn.Dense(
        features,
        kernel_init=dense_kernel_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def select(x, indices: tuple[int, ...] | None):
    """The channels `indices` of x, in that order (a BatchNorm's input selection); None: x itself."""
    if indices is None:
        return x
    if not indices or max(indices) >= x.shape[-1]:
        raise ValueError(f"selections: indices {indices[:8]}... do not select from the {x.shape[-1]} input "
                         "channels; pass the selections prune gave this model")
    return x[..., np.asarray(indices)]


def bn_relu(x, train: bool, *, name: str, dtype=jnp.float32, selection=None):
    """Pre-activation: BatchNorm (of the `selection` of x's channels) then ReLU."""
    return nn.relu(batch_norm(train, name=name, dtype=dtype)(select(x, selection)))


def classify(x, num_classes: int, *, pool: int, dtype=jnp.float32):
    """NS head: average pool with window and stride `pool`, flatten, Dense. Returns float32 logits."""
    x = nn.avg_pool(x, (pool, pool), strides=(pool, pool))
    x = x.reshape((x.shape[0], -1))
    return dense(num_classes, name="fc", dtype=dtype)(x).astype(jnp.float32)


def set_widths(module: nn.Module, default: Sequence[int]) -> None:
    """Resolve `module.widths` (None -> `default`) to a tuple of positive ints of the right length.

    Call from a Linen module's `__post_init__` before `super().__post_init__()`; the attribute is set with
    `object.__setattr__` because the module is not yet initialised then.
    """
    widths = default if module.widths is None else module.widths
    name = type(module).__name__
    try:
        widths = tuple(operator.index(w) for w in widths)
    except TypeError as err:
        raise ValueError(f"{name}: widths must be a sequence of ints, got {module.widths!r}") from err
    if len(widths) != len(default):
        raise ValueError(
            f"{name}: widths has {len(widths)} entries but this architecture has {len(default)} convs; "
            f"pass one output width per conv in creation order (see palm_jax.models)"
        )
    bad = [i for i, w in enumerate(widths) if w <= 0]
    if bad:
        raise ValueError(f"{name}: widths must be positive, got {widths[bad[0]]} at index {bad[0]}")
    object.__setattr__(module, "widths", widths)


def set_selections(module: nn.Module, count: int) -> None:
    """Resolve `module.selections`: None, or one entry per BatchNorm (`count`, forward order), each None
    (the BN reads its input as is) or a non-empty tuple of input channel indices. Call like `set_widths`."""
    selections, name = module.selections, type(module).__name__
    if selections is None:
        return
    try:
        selections = tuple(None if s is None else tuple(operator.index(i) for i in s) for s in selections)
    except TypeError as err:
        raise ValueError(f"{name}: selections must hold None or tuples of ints, got {selections!r}") from err
    if len(selections) != count:
        raise ValueError(f"{name}: selections has {len(selections)} entries but this architecture has "
                         f"{count} BatchNorms; pass one entry (None or input channel indices) per BN in "
                         "forward order")
    if any(s is not None and (not s or min(s) < 0) for s in selections):
        raise ValueError(f"{name}: every entry of selections must be None or non-empty non-negative indices")
    object.__setattr__(module, "selections", selections)


def bn_relu_conv(
    x,
    train: bool,
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    bn_name: str,
    conv_name: str,
    dtype=jnp.float32,
    selection=None,
):
    """Pre-activation unit of PreResNet and DenseNet: BN (of the `selection` of x) -> ReLU -> conv."""
    x = bn_relu(x, train, name=bn_name, dtype=dtype, selection=selection)
    return conv(features, kernel_size, stride=stride, name=conv_name, dtype=dtype)(x)


class SelectingCNN(nn.Module):
    """Base of the CNNs whose BatchNorms read a shared stream (PreResNet, DenseNet): the fields of the width
    protocol with per-BN `selections`, resolved in `__post_init__`. Subclasses give `default_widths()` and
    `bn_count()` (BatchNorms in forward order)."""

    num_classes: int = 10
    widths: tuple[int, ...] | None = None
    dtype: Any = jnp.float32
    selections: tuple | None = None

    def __post_init__(self):
        set_widths(self, self.default_widths())
        set_selections(self, self.bn_count())
        super().__post_init__()

    def default_widths(self) -> tuple[int, ...]:
        raise NotImplementedError

    def bn_count(self) -> int:
        raise NotImplementedError

    def bn_selections(self) -> tuple:
        """The input channels each BN reads, in forward order (None: all)."""
        return self.selections or (None,) * self.bn_count()
