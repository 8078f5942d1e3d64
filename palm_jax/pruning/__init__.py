"""Physically remove the channels whose BatchNorm scales are zero and rebuild a smaller Flax module.

    result = palm_jax.prune(model, {"params": sparse_params, "batch_stats": batch_stats})
    result.model, result.variables, result.report
    palm_jax.save_pruned("runs/pruned", result); palm_jax.load_pruned("runs/pruned")

How channels are coupled comes from the traced computation (the jaxpr of `model.apply(variables, x,
train=False)`), never from per-architecture rules: `trace.py` walks it, `slicing.py` decides and slices,
`widths.py` maps the result back to the model's widths, `report.py` measures, `io.py` saves and loads.

The width protocol (what a model of your own needs to be prunable):
- an attribute `widths: tuple[int, ...]` with the output width of every conv, in the order the convs are
  first applied in the forward pass (creation order for `nn.compact` modules), concrete after construction
  (resolve a `None` default in `__post_init__`);
- every conv reads its output width only from its entry; input widths follow from the data; which layers
  exist does not depend on widths; a pruned model is `model.clone(widths=new_widths)`;
- `__call__(x, train: bool)`, BatchNorm as `nn.BatchNorm` (params `scale`, `bias`, batch_stats `mean`, `var`).
Convs, BatchNorm, Dense, ReLU-like activations, residual adds, concatenations on the channel axis, max / avg
pools, spatial means and flattens are followed; anything else that touches a channel keeps it. The entries are
matched to convs by `jax.eval_shape` of `model.clone(widths=...).init` with each tie group widened by its own
amount, and the sliced variables are checked against the pruned model's init shapes (ValueError otherwise).

The removal rule: channels tied by the trace form one class: a conv's outputs with every BN that reads them,
the operands of a residual add, each input of a concatenation with the matching positions of every BN that
reads the concatenation. A class is removed when every BN scale attached to it meets the criterion
(|scale| <= threshold: exactly 0 by default; `percent=p`: NS's global threshold, the sorted |scales| of all
BNs at index floor(n p / 100)), when every conv / Dense reading it reads it only through those BNs, and when
`min_channels` does not keep it (a conv left with fewer channels gets back its largest-|scale| ones; no conv
is emptied). So a residual width is pruned only where every BN reading it is zero, and a conv -> BN channel
freely.

Folding: a removed channel with scale 0 still emits relu(bias). That constant times the consuming kernel's
taps is added to the first bias or BN running mean downstream (through later linear ops if need be), which is
exact where no zero padding breaks its constancy. Where it does (a 3x3 conv reads a constant as
"value inside, 0 in the padding"), the conv gets a carrier (`exact=True`, the default): an input channel that
is itself a constant c (a scale-0 channel that stays anyway, or else the removed channel with the largest
|constant|, kept with its scale at 0) whose kernel slice gains sum_p value_p * kernel[.., p, ..] / c over the
removed inputs p; padded exactly like them, it brings exactly what they brought, so the pruned model computes
what the model with those scales at zero computes (float rounding aside). `exact=False` folds the closest
per-channel constant there instead (taps weighted by how often they read the input): no extra channel,
approximate. `report["fold"]` lists the convs with carriers, the extra channels they cost
(`carrier_channels`), the layers where folding is approximate and any offset that found nothing to absorb
it; `report["max_logit_deviation"]` measures the result on the probe batch.

The report: params_before / params_after (scalars in the params leaves), flops_before / flops_after (XLA's
cost analysis of one eval forward pass on one example), input_shape, channels_before / channels_after (sums
of widths), layers ([{layer, before, after, clamped, carriers}] per widths entry), kept_meeting_criterion
(conv output channels that meet the criterion but stay, carriers included), threshold, percent,
min_channels, fold, max_logit_deviation.
"""

from palm_jax.pruning.api import PruneResult, prune
from palm_jax.pruning.io import PrunedCheckpointError, load_pruned, save_pruned

__all__ = ["prune", "PruneResult", "save_pruned", "load_pruned", "PrunedCheckpointError"]
