"""The CNNs of Network Slimming (Liu et al., ICCV 2017): VGG, PreResNet, DenseNet (Flax Linen, NHWC).

All take `__call__(x, train: bool)`; `train=True` uses batch statistics and updates `batch_stats` (pass
`mutable=["batch_stats"]`), `train=False` uses the running averages. `dtype` is the compute dtype (e.g.
jnp.bfloat16); parameters are float32 and logits are returned as float32.

All follow the width protocol of `palm_jax.pruning` (described there once), so `palm_jax.prune` rebuilds
them with `model.clone(widths=..., selections=...)`:

- `widths: tuple[int, ...] | None = None`, the output channel count of every conv in creation (= forward)
  order, resolved in `__post_init__` from depth (and growth_rate):
    VGG:       conv0 ... conv{k-1} (16 for VGG-19).
    PreResNet: the stem conv, then for each block conv1, conv2, conv3 and, in the first block of each
               stage, the downsample conv (9n + 4 entries for depth 9n + 2). Every conv3 of a stage and
               that stage's downsample conv are added together and must share one width (checked).
    DenseNet:  the stem conv, each dense layer's conv, each transition's conv (3n + 3 for depth 3n + 4).
  Wrong length, non-integers or non-positive entries raise ValueError naming `widths`.
- PreResNet and DenseNet also have `selections: tuple | None = None`, one entry per BatchNorm in forward
  order (PreResNet: each block's bn1, bn2, bn3, then bn_final; DenseNet: each dense layer's and
  transition's bn, then bn_final): the input channels that BN reads (None: all), as NS's channel_selection
  layers. VGG's BNs read their own conv's output only and need none.

Layer names are deterministic and follow creation order (e.g. VGG: conv0, bn0, conv1, ...; PreResNet:
conv0, stage1_block0/{bn1, conv1, ..., downsample}, ..., bn_final, fc).

Initialisation follows NS: conv kernels N(0, 2 / (k * k * out_channels)), BN scale 0.5 and bias 0, Dense
kernel N(0, 0.01^2) and bias 0 (see `palm_jax.models.layers`).
"""

from palm_jax.models.densenet import DenseNet
from palm_jax.models.preresnet import PreResNet
from palm_jax.models.vgg import VGG

__all__ = ["VGG", "PreResNet", "DenseNet"]
