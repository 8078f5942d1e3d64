"""The width protocol: which conv each entry of `model.widths` controls, and the `selections` of its BNs.

A prunable model has `widths: tuple[int, ...]`, the output width of every conv in the order the convs are
first applied (for `nn.compact` modules: creation order); every conv reads its width only from its entry and
a pruned model is `model.clone(widths=new)`. Entries whose convs are added together (residual ties) move
together, so the entries are perturbed by one distinct amount per tie group (groups from the traced channel
ties; an entry that is a multiple of its group's smallest, like a depthwise conv with a channel multiplier,
moves by that multiple) and `jax.eval_shape(model.clone(widths=perturbed).init)` tells, by how much each
kernel's output axis grew, which entries control it. Nothing here depends on the architecture.
"""

import math

import jax

from palm_jax.utils import abstract_variables, leaf_path


def protocol_error(model, detail: str) -> ValueError:
    return ValueError(
        f"prune: {type(model).__name__} does not follow the width protocol: {detail}. Give the module an "
        "attribute `widths: tuple[int, ...]` with the output width of every conv in the order the convs are "
        "applied, read each conv's width from it, and make model.clone(widths=...) build the same "
        "architecture with those widths (see palm_jax.pruning)"
    )


def model_widths(model) -> tuple[int, ...]:
    widths = getattr(model, "widths", None)
    if widths is None:
        raise protocol_error(model, "it has no concrete `widths` attribute")
    try:
        return tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise protocol_error(model, f"widths={widths!r} is not a sequence of ints") from None


def gathers(model) -> bool:
    """Whether the model can gather each BatchNorm's input (it has a `selections` field)."""
    return "selections" in getattr(model, "__dataclass_fields__", {})


def resolve(model, structure, init_shapes) -> list[list[int]]:
    """For each widths entry, the kernel leaves (indices) whose output axis it sets.

    `init_shapes(model)` returns the leaf shapes of `jax.eval_shape(model.init)` in the order of the
    structure's leaves."""
    widths = model_widths(model)
    layers, axes, roots = structure.layers, structure.axes, structure.graph.all_roots()
    convs = [layer for layer in layers if layer.kind == "conv"]
    if len(convs) != len(widths):
        raise protocol_error(model, f"widths has {len(widths)} entries but the forward pass applies "
                                    f"{len(convs)} convs")
    tie = {}  # tie class of a layer's output axis -> group number
    key = lambda layer: tuple(roots[axes[layer.kernel][layer.out_axis]].tolist())
    group = [tie.setdefault(key(c), len(tie)) for c in convs]
    base = {g: min(w for w, h in zip(widths, group, strict=True) if h == g) for g in set(group)}
    step = math.lcm(1, *(c.groups for c in convs if c.groups > 1 and not c.depthwise))
    amount = lambda g, width: (g + 1) * step * (width // base[g] if width % base[g] == 0 else 1)
    perturbed = tuple(w + amount(g, w) for w, g in zip(widths, group, strict=True))
    try:
        shapes = init_shapes(model.clone(widths=perturbed))
    except LeafMismatch:
        raise
    except Exception as err:  # any failure of the user's module means the protocol does not hold
        raise protocol_error(
            model, f"model.clone(widths=...) with each tie group widened by its own amount failed to "
                   f"initialise ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    grown = {}  # group -> kernels (forward order) whose output axis grew with that group
    for layer in layers:
        old = structure.axes[layer.kernel][layer.out_axis].size
        size = shapes[layer.kernel][layer.out_axis] - old
        if size == 0:
            continue
        fits = [g for g in base if amount(g, old) == size]
        g = tie.get(key(layer)) if tie.get(key(layer)) in fits else (fits[0] if len(fits) == 1 else None)
        if g is None:
            raise protocol_error(model, f"the output width of {layer.name} changed by {size}, which no "
                                        "widths entry (or tie group of entries) accounts for")
        grown.setdefault(g, []).append(layer)
    unused = [i for i, g in enumerate(group) if g not in grown]
    if unused:
        raise protocol_error(model, f"widths[{unused[0]}] sets the output width of no conv")
    controls = []
    for i, g in enumerate(group):
        kernels = grown[g]
        rank = group[:i].count(g)  # tied entries and their convs pair up in forward order
        own = kernels[rank] if len(kernels) == group.count(g) else kernels[0]
        controls.append([own.kernel] + [k.kernel for k in kernels if k is not own])
    return controls


def selections(model, structure, plan) -> tuple | None:
    """The pruned model's `selections`: per BN in forward order, the stream positions it reads (None: all
    kept ones in order); None when no BN needs one."""
    chosen = tuple(plan.selections.get(name) for name in structure.bn_order())
    return None if all(s is None for s in chosen) else chosen


class LeafMismatch(ValueError):
    """The variables do not have the leaves the model creates."""


def abstract_shapes(model, probe, paths) -> list[tuple[int, ...]]:
    """Leaf shapes of `model.init` on a one-example probe, in the order of `paths`."""
    variables = abstract_variables(model, probe.shape[1:])
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    )[0]:
        found[leaf_path(path)] = tuple(leaf.shape)
    if set(found) != set(paths):
        missing = sorted("/".join(p) for p in set(paths) ^ set(found))
        raise LeafMismatch(f"prune: the variables and {type(model).__name__}.init differ in the leaves "
                           f"{missing[:3]}; pass the variables of this model")
    return [found[p] for p in paths]


def kept_widths(model, controls, plan) -> tuple[int, ...]:
    """The pruned model's widths: each entry's own conv's kept output channels."""
    return tuple(plan.widths[kernels[0]] for kernels in controls)

