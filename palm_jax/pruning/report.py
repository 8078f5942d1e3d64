"""Sizes and costs for the prune report: exact parameter counts, XLA's FLOP count, logit deviation."""

import jax
import numpy as np


def count_params(params) -> int:
    """Number of scalars in the params leaves."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def forward_flops(model, variables, input_shape) -> float:
    """FLOPs of one eval-mode forward pass on one example, from XLA's HLO cost analysis.

    XLA counts a multiply-add as 2 FLOPs, skips the conv taps that fall on zero padding and counts every
    elementwise op (BN, ReLU, adds) too. It is counted on the lowered program, so no compilation is paid;
    `jax.jit(f).lower(...).compile().cost_analysis()` gives the same count (both checked in the tests).
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if not cost or "flops" not in cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returns one dict per program
        cost = cost[0]
    return float(cost["flops"])


def logits(model, variables, probe) -> np.ndarray:
    """Eval-mode outputs at full float32 precision (no TF32 on GPUs, which would hide a 1e-6 deviation)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, probe))


def summary(before, after, probe, **fields) -> dict:
    """The prune report: sizes, costs and the largest logit deviation of (model, variables) pairs."""
    (model, variables), (pruned, new_variables) = before, after
    input_shape = tuple(probe.shape[1:])
    deviation = np.max(np.abs(logits(model, variables, probe) - logits(pruned, new_variables, probe)))
    return {
        "params_before": count_params(variables["params"]),
        "params_after": count_params(new_variables["params"]),
        "flops_before": forward_flops(model, variables, input_shape),
        "flops_after": forward_flops(pruned, new_variables, input_shape),
        "input_shape": list(input_shape),
        "channels_before": int(sum(model.widths)),
        "channels_after": int(sum(pruned.widths)),
        **fields,
        "max_logit_deviation": float(deviation),
    }
