"""The prune report (sizes, costs in both FLOP conventions, channels, folding), the exactness check and the
message that refuses a model the pruner cannot prune exactly. Shared by every front end."""

import functools

import jax
import numpy as np

from palm_jax.pruning import evaluate
from palm_jax.utils import leaf_path

FLOPS_CONVENTIONS = {
    "flops": "XLA's HLO cost analysis of one eval forward pass on one example: 2 per multiply-add, conv taps "
             "on zero padding skipped, 1 per element of every elementwise op",
    "flops_ns": "Network Slimming's compute_flops (the papers' tables): 2 per multiply-add of every conv / "
                "Dense tap, padding included, +1 per output with a bias, 2 per BN input element, 1 per "
                "ReLU element, window size per pooled output",
}


def forward_flops(model, variables, input_shape) -> float:
    """FLOPs of one eval-mode forward pass on one example, from XLA's HLO cost analysis of the lowered
    program (no compilation; `prune` counts the same from its jaxpr, `palm_jax.pruning.flops`).

    XLA counts a multiply-add as 2 FLOPs, skips the conv taps that fall on zero padding and counts every
    elementwise op (BN, ReLU, adds) too; `jax.jit(f).lower(...).compile().cost_analysis()` gives the same
    count (both checked in the tests).
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if not cost or "flops" not in cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returns one dict per program
        cost = cost[0]
    return float(cost["flops"])


def check(closed, values, plan, pruned_closed, probe) -> dict:
    """Logits of the sparse model (`plan.reference`: scales of removed channels at zero), of the given one
    (`values`) and of the pruned one on the probe, all evaluated in float64: their deviations."""
    reference = evaluate.run(closed, [*plan.reference, probe])[0]
    same = all(np.array_equal(a, b) for a, b in zip(plan.reference, values, strict=True))
    given = reference if same else evaluate.run(closed, [*values, probe])[0]
    pruned = evaluate.run(pruned_closed, [*plan.values, probe])[0]
    deviation = float(np.max(np.abs(pruned - reference)))
    return {
        "max_abs_deviation": deviation,
        "relative_deviation": deviation / max(float(np.max(np.abs(reference))), 1e-30),
        "max_logit_deviation": float(np.max(np.abs(pruned - given))),
        "images": int(probe.shape[0]),
    }


def summary(plan, structure, kernels, probe, check, *, flops_before, flops_after, percent, min_channels,
            tolerance, seconds) -> dict:
    """The prune report (see palm_jax.pruning for every key); `kernels` are the conv kernels (leaf indices)
    reported per layer (for the width protocol: each widths entry's own conv)."""
    names = {layer.kernel: layer for layer in structure.layers}
    width = lambda k: int(structure.axes[k][names[k].out_axis].size)
    params = lambda values: int(sum(np.size(v) for p, v in zip(structure.paths, values, strict=True)
                                    if p[0] == "params"))
    bns = plan.bn_channels
    return {
        "params_before": params(plan.reference),
        "params_after": params(plan.values),
        "flops_before": flops_before["xla"],
        "flops_after": flops_after["xla"],
        "flops_ns_before": flops_before["papers"],
        "flops_ns_after": flops_after["papers"],
        "flops_conventions": FLOPS_CONVENTIONS,
        "input_shape": list(probe.shape[1:]),
        "channels_before": sum(width(k) for k in kernels),
        "channels_after": sum(plan.widths[k] for k in kernels),
        "bn_channels_before": int(sum(b[1] for b in bns)),
        "bn_channels_after": int(sum(b[2] for b in bns)),
        "layers": [
            {"layer": names[k].name, "before": width(k), "after": plan.widths[k],
             "clamped": k in plan.clamped, "carriers": plan.carriers[k]}
            for k in kernels
        ],
        "batchnorms": [
            {"bn": name, "before": before, "after": after, "carriers": carriers,
             "selects": plan.selections.get(name) is not None}
            for name, before, after, carriers, _ in bns
        ],
        "kept_meeting_criterion": plan.kept_meeting,
        "threshold": plan.threshold,
        "percent": percent,
        "min_channels": min_channels,
        "fold": plan.fold,
        "max_logit_deviation": check["max_logit_deviation"],
        "check": {
            "relative_deviation": check["relative_deviation"],
            "max_abs_deviation": check["max_abs_deviation"],
            "tolerance": tolerance,
            "reference": "the model with the scales of the removed (and carrier) channels at zero",
            "images": check["images"],
        },
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }


def refusal(name: str, plan, check, tolerance, where: str | None, cause: str | None = None) -> str:
    """Why `prune` refuses: the deviation, the fold's own account or the first BatchNorm whose kept outputs
    differ (`where`; `cause` instead for a front end that cannot tell), and the way out."""
    fold = plan.fold
    if fold["approximate"] or fold["unabsorbed"]:
        cause = (f"folding was approximate at {fold['approximate'][:3]} and left offsets unabsorbed at "
                 f"{[u['at'] for u in fold['unabsorbed']][:3]}")
    elif cause is None:
        cause = (f"the first BatchNorm whose kept channels differ is {where}; the model likely uses its "
                 "widths beyond shapes (e.g. a scale computed from widths) or applies `selections` to "
                 "other BatchNorms than their forward order" if where else
                 "the outputs differ after the last BatchNorm; the model likely uses its widths beyond "
                 "shapes")
    return (f"prune: the pruned {name} differs from the model with the removed scales at zero by "
            f"{check['relative_deviation']:.2e} (relative logit deviation on the probe, tolerance="
            f"{tolerance:g}): {cause}. Pass a larger tolerance= to accept it, or exact=False to accept the "
            "closest-constant fold")


def first_difference(model, pruned, reference, values, plan, probe, tolerance) -> str | None:
    """The first BatchNorm (forward order) whose output on the kept channels differs between two Linen
    models (sparse `model` with `reference` variables, `pruned` with `values`)."""
    masks = {}
    for (path, _), mask in zip(jax.tree_util.tree_flatten_with_path(values)[0], plan.keep, strict=True):
        keys = leaf_path(path)
        if keys[0] == "params" and keys[-1] == "scale":
            masks["/".join(keys[1:-1])] = mask[0]
    capture = functools.partial(_intermediates, probe=probe)
    before, after = capture(model, reference), capture(pruned, values)
    for name, *_ in plan.bn_channels:
        a, b = _find(before, name), _find(after, name)
        if a is None or b is None or name not in masks:
            continue
        a = np.asarray(a)[..., masks[name]]
        if a.shape != np.shape(b) or np.max(np.abs(a - b)) > tolerance * max(np.max(np.abs(a)), 1e-30):
            return name
    return None


def _intermediates(model, variables, probe):
    with jax.default_matmul_precision("highest"):
        _, state = model.apply(variables, probe, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
    return state["intermediates"]


def _find(tree, name: str):
    for part in name.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    out = tree.get("__call__") if isinstance(tree, dict) else None
    return out[0] if out else None
