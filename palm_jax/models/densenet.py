"""DenseNet for CIFAR as in Network Slimming (models/densenet.py: no bottleneck, compression 1)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from palm_jax.models.layers import SelectingCNN, bn_relu, bn_relu_conv, classify, conv

NUM_BLOCKS = 3


class PreActConv(nn.Module):
    """BN -> ReLU -> conv (params `bn`, `conv`): a dense layer (3x3) or a transition (1x1); the BN reads
    the input channels `selection` (None: all)."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    selection: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        return bn_relu_conv(x, train, self.features, self.kernel_size, bn_name="bn", conv_name="conv",
                            dtype=self.dtype, selection=self.selection)


def _layers_per_block(depth: int) -> int:
    if depth < 7 or (depth - 4) % 3:
        raise ValueError(f"DenseNet: depth must be 3n + 4 with n >= 1 (7, 10, ..., 40), got {depth}")
    return (depth - 4) // 3


def _default_widths(depth: int, growth_rate: int) -> tuple[int, ...]:
    n = _layers_per_block(depth)
    widths, channels = [2 * growth_rate], 2 * growth_rate
    for block in range(NUM_BLOCKS):
        widths += [growth_rate] * n
        channels += n * growth_rate
        if block < NUM_BLOCKS - 1:
            widths.append(channels)  # compression 1: a transition keeps its input width
    return tuple(widths)


class DenseNet(SelectingCNN):
    """NS DenseNet: stem conv3x3 to 2 * growth_rate, three dense blocks of n BN-ReLU-conv3x3 layers whose
    outputs are concatenated to their inputs (depth 3n + 4), BN-ReLU-conv1x1-avgpool2 transitions, BN-ReLU,
    8x8 avg pool, Dense.

    widths: stem, each dense layer's conv, each transition's conv, in forward order. selections: None, or
    per BN in forward order (each dense layer's and transition's, then bn_final) the channels of the
    concatenation it reads (None: all), as NS's channel_selection layers; `palm_jax.prune` sets them.
    Expects 32x32 inputs.
    """

    depth: int = 40
    growth_rate: int = 12

    def default_widths(self) -> tuple[int, ...]:
        if self.growth_rate <= 0:
            raise ValueError(f"DenseNet: growth_rate must be positive, got {self.growth_rate}")
        return _default_widths(self.depth, self.growth_rate)

    def bn_count(self) -> int:
        return len(self.default_widths())  # one BN per conv but the stem, plus bn_final

    @nn.compact
    def __call__(self, x, train: bool):
        n = _layers_per_block(self.depth)
        selections = self.bn_selections()
        x = conv(self.widths[0], 3, name="conv0", dtype=self.dtype)(x)
        i = 1  # widths[i] is the conv after BN selections[i - 1]
        for block in range(NUM_BLOCKS):
            for layer in range(n):
                out = PreActConv(self.widths[i], 3, self.dtype, selections[i - 1],
                                 name=f"block{block + 1}_layer{layer}")(x, train)
                x = jnp.concatenate([x, out], axis=-1)
                i += 1
            if block < NUM_BLOCKS - 1:
                x = PreActConv(self.widths[i], 1, self.dtype, selections[i - 1],
                               name=f"transition{block + 1}")(x, train)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
                i += 1
        x = bn_relu(x, train, name="bn_final", dtype=self.dtype, selection=selections[i - 1])
        return classify(x, self.num_classes, pool=8, dtype=self.dtype)
