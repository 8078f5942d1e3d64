"""Pre-activation bottleneck ResNet for CIFAR as in Network Slimming (models/preresnet.py of the NS code)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from palm_jax.models.layers import SelectingCNN, bn_relu, bn_relu_conv, classify, conv

STAGE_PLANES = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
EXPANSION = 4
STEM_WIDTH = 16


class Bottleneck(nn.Module):
    """bn1-relu-conv1x1, bn2-relu-conv3x3(stride), bn3-relu-conv1x1, plus the input x or `downsample(x)`.

    `widths` is this block's slice of the parent's widths: (conv1, conv2, conv3) or, with a downsample conv
    (a strided 1x1 conv on x, no BN, as in NS), (conv1, conv2, conv3, downsample); `selections` its slice of
    the parent's selections: (bn1, bn2, bn3), the input channels each BN reads (None: all).
    """

    widths: tuple[int, ...]
    stride: int = 1
    dtype: Any = jnp.float32
    selections: tuple = (None, None, None)

    @nn.compact
    def __call__(self, x, train: bool):
        w, d, s = self.widths, self.dtype, self.selections
        out = bn_relu_conv(x, train, w[0], 1, bn_name="bn1", conv_name="conv1", dtype=d, selection=s[0])
        out = bn_relu_conv(out, train, w[1], 3, stride=self.stride, bn_name="bn2", conv_name="conv2", dtype=d,
                           selection=s[1])
        out = bn_relu_conv(out, train, w[2], 1, bn_name="bn3", conv_name="conv3", dtype=d, selection=s[2])
        if len(self.widths) == 4:
            x = conv(self.widths[3], 1, stride=self.stride, name="downsample", dtype=self.dtype)(x)
        return out + x


def _num_blocks(depth: int) -> int:
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"PreResNet: depth must be 9n + 2 with n >= 1 (11, 20, ..., 164), got {depth}")
    return (depth - 2) // 9


def _default_widths(depth: int) -> tuple[int, ...]:
    widths = [STEM_WIDTH]
    for planes in STAGE_PLANES:
        for b in range(_num_blocks(depth)):
            widths += [planes, planes, planes * EXPANSION] + ([planes * EXPANSION] if b == 0 else [])
    return tuple(widths)


class PreResNet(SelectingCNN):
    """NS PreResNet: stem conv3x3, three stages of n bottleneck blocks (depth 9n + 2), BN-ReLU, 8x8 avg pool,
    Dense.

    widths: stem, then per block conv1, conv2, conv3 and, in each stage's first block, the downsample conv.
    Within a stage, every conv3 and the downsample conv are added together and must share one width.
    selections: None, or per BN in forward order (each block's bn1, bn2, bn3, then bn_final) the residual
    stream channels it reads (None: all), as NS's channel_selection layers; `palm_jax.prune` sets them.
    Expects 32x32 inputs (CIFAR), NHWC.
    """

    depth: int = 164

    def default_widths(self) -> tuple[int, ...]:
        return _default_widths(self.depth)

    def bn_count(self) -> int:
        return 3 * 3 * _num_blocks(self.depth) + 1  # bn1, bn2, bn3 per block, then bn_final

    def __post_init__(self):
        super().__post_init__()
        for s, block_widths in enumerate(self._block_widths()):
            residual = {w[2] for w in block_widths} | {block_widths[0][3]}
            if len(residual) > 1:
                raise ValueError(
                    f"PreResNet: widths of stage {s + 1}'s conv3 and downsample convs are added together and "
                    f"must be equal, got {sorted(residual)}"
                )

    def _block_widths(self) -> list[list[tuple[int, ...]]]:
        """Per stage, per block, the slice of `widths` that the block's convs use."""
        stages, i = [], 1
        for _ in STAGE_PLANES:
            blocks = []
            for b in range(_num_blocks(self.depth)):
                k = 4 if b == 0 else 3
                blocks.append(self.widths[i : i + k])
                i += k
            stages.append(blocks)
        return stages

    @nn.compact
    def __call__(self, x, train: bool):
        selections = self.bn_selections()
        x = conv(self.widths[0], 3, name="conv0", dtype=self.dtype)(x)
        k = 0
        for s, (blocks, stride) in enumerate(zip(self._block_widths(), STAGE_STRIDES, strict=True)):
            for b, block_widths in enumerate(blocks):
                x = Bottleneck(
                    block_widths, stride if b == 0 else 1, self.dtype, selections[k : k + 3],
                    name=f"stage{s + 1}_block{b}",
                )(x, train)
                k += 3
        x = bn_relu(x, train, name="bn_final", dtype=self.dtype, selection=selections[k])
        return classify(x, self.num_classes, pool=8, dtype=self.dtype)
