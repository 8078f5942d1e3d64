"""Physically remove the channels whose BatchNorm scales are zero and rebuild a smaller Flax module.

    result = palm_jax.prune(model, {"params": sparse_params, "batch_stats": batch_stats})   # Linen
    result = palm_jax.prune(nnx_model, probe=images[:8])                                   # Flax NNX
    result.model, result.variables, result.report
    palm_jax.save_pruned("runs/pruned", result); palm_jax.load_pruned("runs/pruned")

How channels are coupled comes from the traced computation (the jaxpr of `model.apply(variables, x,
train=False)`), never from per-architecture rules. The model is traced once per (model, variable shapes,
probe shape) and the analysis cached, so pruning the same model again (other thresholds, other scales)
only decides, folds, slices and checks.

The width protocol (what a Linen model of your own needs to be prunable):
- an attribute `widths: tuple[int, ...]` with the output width of every conv, in the order the convs are
  first applied in the forward pass (creation order for `nn.compact` modules), concrete after construction
  (resolve a `None` default in `__post_init__`);
- every conv reads its output width only from its entry; input widths follow from the data; which layers
  exist does not depend on widths; a pruned model is `model.clone(widths=new_widths)`. A depthwise conv
  (`feature_group_count` equal to its input channels) sets its group count from its input
  (`feature_group_count=x.shape[-1]`) and is listed in widths like any conv; a grouped conv keeps its
  group count (its channels go per-group equally);
- optionally `selections: tuple | None = None`, one entry per nn.BatchNorm in forward order: None (the BN
  reads its input as is) or a tuple of input channel indices (it reads `x[..., indices]`, what Network
  Slimming's channel_selection layer does). With it, a BN that reads a stream shared by others (a residual
  stream, a concatenation) drops its own zero-scale channels and the stream keeps what its other readers
  need; `prune` sets it (an entry only where a BN reads something else than all kept stream channels in
  order). Without it, the BNs reading one stream are tied: a stream channel goes only where all are zero;
- `__call__(x, train: bool)`, BatchNorm as `nn.BatchNorm` (params `scale`, `bias`, batch_stats `mean`,
  `var`). Convs (also depthwise / grouped), BatchNorm, Dense, ReLU-like activations, residual adds,
  concatenations on the channel axis, max / average pools (zero-padded too), spatial means, flattens and
  channel gathers are followed; anything else that touches a channel keeps it.
For example (`tests/test_prune_protocol.py::Example` prunes it), a residual stream read by two BNs:

    class Example(nn.Module):
        widths: tuple[int, ...] = (16, 8, 16)
        selections: tuple | None = None

        @nn.compact
        def __call__(self, x, train: bool):
            sel = self.selections or (None, None, None)
            pick = lambda v, s: v if s is None else v[..., np.asarray(s)]
            bn = functools.partial(nn.BatchNorm, use_running_average=not train)
            a = nn.Conv(self.widths[0], (3, 3))(x)
            h = nn.relu(bn()(pick(a, sel[0])))
            h = nn.relu(bn()(pick(nn.Conv(self.widths[1], (3, 3))(h), sel[1])))
            r = a + nn.Conv(self.widths[2], (1, 1))(h)  # widths[0] and widths[2] are added: tied
            return nn.Dense(10)(nn.relu(bn()(pick(r, sel[2]))).mean(axis=(1, 2)))

The entries are matched to convs by `jax.eval_shape` of `model.clone(widths=...).init` with each tie group
widened by its own amount. The pruned model is then traced on the probe (Flax checks every parameter's
shape) and compared with the sparse one: a model breaking the protocol (e.g. scaling by 1 / sqrt(width))
raises ValueError naming the first BatchNorm whose kept outputs differ.

The removal rule: channels tied by the trace form one class (a conv's outputs with the BNs tied to them,
the operands of a residual add, each input of a concatenation with the matching positions of tied BNs).
A BN that gathers has its own class per channel, joined to the stream channel it reads by a gather edge.
A class is removed when every BN scale in it meets the criterion (|scale| <= threshold: exactly 0 by
default; `percent=p`: NS's global threshold, the sorted |scales| of all BNs at index floor(n p / 100)),
when a resizable conv or a gather produces it, every conv / Dense reading it reads it only through zero
scales, every gather edge out of it leads to a removed class, and `min_channels` does not keep it (a conv
or gather left with fewer channels gets back its largest-|scale| ones; none is emptied).

Folding: a removed channel with scale 0 still emits relu(bias). That constant times the consuming kernel's
taps is added to the first bias or BN running mean downstream, which is exact where the constant stays
uniform over the image. Where it does not (zero padding next to the conv; a zero-padded average pool with
count_include_pad, which turns it into the pool's coverage pattern; a nonlinearity or an output the offset
would reach), the conv concerned gets a carrier (`exact=True`, the default): one input channel that is
itself constant (a scale-0 channel kept anyway, or else a removed one kept with its scale at 0) whose
kernel slice takes over what the removed constants brought; padded and pooled exactly as they were, it
brings exactly what they brought. A depthwise conv passes its input's constants to its own (removed)
outputs; a padded grouped conv cannot carry, so the channels it reads that way are kept. `exact=False`
folds the closest per-channel constant instead (no extra channel, approximate).

The check: the pruned and the sparse model (scales of removed channels and carriers at zero) run on the
probe in float64 NumPy (`evaluate.py`: no compilation, no float32 rounding); with fold and exact, a relative
logit deviation max|pruned - sparse| / max|sparse| above `tolerance` (default 1e-5) raises ValueError.

The report: params_before / params_after (scalars in the params leaves); flops_before / flops_after (XLA's
convention: its HLO cost analysis of one eval forward on one example, equal to `report.forward_flops`,
padding taps skipped, every elementwise op counted) and flops_ns_before / flops_ns_after (the papers'
convention, NS's compute_flops: 2 per multiply-add of every conv / Dense tap, padding included, 2 per BN
element, 1 per ReLU element, the window per pooled output; VGG-19 on 32x32 is 7.97e8), both counted from
the jaxprs (`flops.py`), described in flops_conventions; input_shape; channels_before / channels_after
(sums of widths); bn_channels_before / bn_channels_after; layers ([{layer, before, after, clamped,
carriers}] per widths entry); batchnorms ([{bn, before, after, carriers, selects}] in forward order);
kept_meeting_criterion (conv output channels whose scales meet the criterion but stay, carriers not
included: they are in fold.carrier_channels); threshold, percent, min_channels; fold ({enabled, absorbed,
approximate, carriers: the convs whose kernel a carrier changed, carrier_channels, unabsorbed, blocked});
max_logit_deviation (from the model as given, float64); check ({relative_deviation, max_abs_deviation,
tolerance, reference, images}); seconds ({trace, decide, fold, slice, check}).

Flax NNX (`nnx.py`, `nnx_layers.py`): `prune(module, probe=x)` takes any `nnx.Module` called as `model(x)`,
no protocol: the NNX state gives the leaves (`nnx.Param` as params, `nnx.BatchStat` as batch_stats; other
Variables are read as constants, so what they touch is kept), the trace runs on a copy in `eval()` mode, and
the rebuild copies the module graph with the sliced arrays and sets each layer's feature counts. Exactly
nnx.Conv (depthwise and grouped too), nnx.Linear and nnx.BatchNorm are resized; every nnx.BatchNorm may
gather (it becomes a `GatherBatchNorm`, an nnx.BatchNorm of `x[..., indices]`). Any other module holding
Params or BatchStats itself (a user's layer, nnx.LayerNorm / GroupNorm, a masked conv) keeps its variables
and the channels they touch: report["left_alone"] ([{module, class, why}]) lists them and the user's own
Variables. In the report, `layers` are then every resized conv / Dense layer in forward order. A module
without nnx.BatchNorm is refused (nothing could be removed); `probe` is required (no default input fits a
module built for one size). `save_pruned(path, result, constructor=...)` stores the unpruned module's
constructor (its class by default, or a functools.partial with its arguments) and the pruned shapes;
`load_pruned` builds it under `nnx.eval_shape` and restores the state (`io.py`).

The engine (`engine.py`) is independent of the rebuild: its input is the leaves (paths, values), the closed
jaxpr of an eval-mode forward over (leaves, input), which BNs may gather, which leaves keep their shapes and
which conv / Dense kernels may change width; its output is per-leaf per-axis keep masks, the sliced and
folded values, per-BN gather indices and the report's parts. The front ends rebuild Linen modules (`api.py`,
`widths.py`) and NNX modules (`nnx.py`, `nnx_layers.py`); `trace.py` and `shapes.py` walk the jaxpr,
`slicing.py` decides and slices, `flops.py` counts, `report.py` checks and reports, `io.py` saves and loads.
"""

from palm_jax.pruning.api import PruneResult, prune
from palm_jax.pruning.io import PrunedCheckpointError, load_pruned, save_pruned
from palm_jax.pruning.nnx_layers import GatherBatchNorm

__all__ = ["prune", "PruneResult", "save_pruned", "load_pruned", "PrunedCheckpointError", "GatherBatchNorm"]
