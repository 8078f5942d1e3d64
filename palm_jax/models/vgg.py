"""VGG for CIFAR as in Network Slimming (models/vgg.py of the reference code)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from palm_jax.models.layers import batch_norm, classify, conv, set_widths

# Channel lists of NS; "M" is a 2x2 max pool.
VGG_CFG = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class VGG(nn.Module):
    """conv3x3 (no bias) -> BN -> ReLU stacks with max pools, a final 2x2 average pool and one Dense layer.

    `widths[i]` is the output width of `conv{i}`; None means the NS channel list of `depth`.
    Expects 32x32 inputs (CIFAR), NHWC.
    """

    depth: int = 19
    num_classes: int = 10
    widths: tuple[int, ...] | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.depth not in VGG_CFG:
            raise ValueError(f"VGG: depth must be one of {sorted(VGG_CFG)}, got {self.depth}")
        set_widths(self, tuple(c for c in VGG_CFG[self.depth] if c != "M"))
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool):
        i = 0
        for c in VGG_CFG[self.depth]:
            if c == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = conv(self.widths[i], 3, name=f"conv{i}", dtype=self.dtype)(x)
            x = nn.relu(batch_norm(train, name=f"bn{i}", dtype=self.dtype)(x))
            i += 1
        return classify(x, self.num_classes, pool=2, dtype=self.dtype)
