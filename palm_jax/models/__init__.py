"""The CNNs of Network Slimming (Liu et al., ICCV 2017): VGG, PreResNet, DenseNet (Flax Linen, NHWC).

All take `__call__(x, train: bool)`; `train=True` uses batch statistics and updates `batch_stats` (pass
`mutable=["batch_stats"]`), `train=False` uses the running averages. `dtype` is the compute dtype (e.g.
jnp.bfloat16); parameters are float32 and logits are returned as float32.

Width protocol (what `palm_jax.prune` relies on; follow it to make your own CNN prunable):

- The module has one attribute `widths: tuple[int, ...] | None = None` holding the output channel count of
  EVERY conv layer, in the order the convs are created (= forward order; the params dict itself is sorted
  by name, as every pytree dict is):
    VGG:       conv0 ... conv{k-1} (16 for VGG-19).
    PreResNet: the stem conv, then for each block conv1, conv2, conv3 and, in the first block of each
               stage, the downsample conv (9n + 4 entries for depth 9n + 2).
    DenseNet:  the stem conv, each dense layer's conv, each transition's conv (3n + 3 for depth 3n + 4).
- `widths=None` is resolved in `__post_init__` from depth (and growth_rate), so `model.widths` always holds
  the concrete tuple. Wrong length, non-integers or non-positive entries raise ValueError naming `widths`.
- Each conv reads its output width only from `self.widths[i]`; every input width follows from the data, and
  no other channel count is hard-coded. Which layers exist (pools, downsample convs, block counts) depends
  only on depth, never on widths. So a pruned model is `model.clone(widths=smaller_widths)`.
- Tensors added by a residual connection must have equal widths: in PreResNet, every conv3 of a stage and that
  stage's downsample conv share one width (checked at construction). Concatenations impose no constraint.

Layer names are deterministic and follow creation order (e.g. VGG: conv0, bn0, conv1, ...; PreResNet:
conv0, stage1_block0/{bn1, conv1, ..., downsample}, ..., bn_final, fc).

Initialisation follows NS: conv kernels N(0, 2 / (k * k * out_channels)), BN scale 0.5 and bias 0, Dense
kernel N(0, 0.01^2) and bias 0 (see `palm_jax.models.layers`).
"""

from palm_jax.models.densenet import DenseNet
from palm_jax.models.preresnet import PreResNet
from palm_jax.models.vgg import VGG

__all__ = ["VGG", "PreResNet", "DenseNet"]
