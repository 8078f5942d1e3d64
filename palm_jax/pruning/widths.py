"""The width protocol: which conv each entry of `model.widths` controls, found from init shapes.

A prunable model has `widths: tuple[int, ...]`, the output width of every conv in the order the convs are
first applied (for `nn.compact` modules: creation order); every conv reads its width only from its entry and
a pruned model is `model.clone(widths=new)`. Entries whose convs are added together (residual ties) move
together, so the entries are perturbed by one distinct amount per tie group (groups from the traced channel
ties) and `jax.eval_shape(model.clone(widths=perturbed).init)` tells, by how much each kernel's output axis
grew, which entries control it. Nothing here depends on the architecture.
"""

import jax
import numpy as np

from palm_jax.pruning.graph import ChannelGraph


def _protocol_error(model, detail: str) -> ValueError:
    return ValueError(
        f"prune: {type(model).__name__} does not follow the width protocol: {detail}. Give the module an "
        "attribute `widths: tuple[int, ...]` with the output width of every conv in the order the convs are "
        "applied, read each conv's width from it, and make model.clone(widths=...) build the same "
        "architecture with those widths (see palm_jax.pruning)"
    )


def model_widths(model) -> tuple[int, ...]:
    widths = getattr(model, "widths", None)
    if widths is None:
        raise _protocol_error(model, "it has no concrete `widths` attribute")
    try:
        return tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise _protocol_error(model, f"widths={widths!r} is not a sequence of ints") from None


def resolve(model, layers, leaves, graph: ChannelGraph, init_shapes) -> list[list[int]]:
    """For each widths entry, the kernel leaves (indices) whose output axis it sets.

    `layers` are the traced conv/Dense layers in forward order, `init_shapes(model)` returns the leaf shapes
    of `jax.eval_shape(model.init)` in the order of `leaves`.
    """
    widths = model_widths(model)
    convs = [layer for layer in layers if layer.kind == "conv"]
    if len(convs) != len(widths):
        raise _protocol_error(model, f"widths has {len(widths)} entries but the forward pass applies "
                                     f"{len(convs)} convs")
    tie = {}  # tie class of a layer's output axis -> group number
    group = [tie.setdefault(tuple(graph.roots(leaves[c.kernel].axes[c.out_axis])), len(tie)) for c in convs]
    delta = np.asarray(group) + 1
    perturbed = tuple(int(w + d) for w, d in zip(widths, delta, strict=True))
    try:
        shapes = init_shapes(model.clone(widths=perturbed))
    except Exception as err:  # any failure of the user's module means the protocol does not hold
        raise _protocol_error(
            model, f"model.clone(widths=...) with each tie group widened by its own amount failed to "
                   f"initialise ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    grown = {}  # group -> kernels (forward order) whose output axis grew by that group's amount
    for layer in layers:
        size = shapes[layer.kernel][layer.out_axis] - leaves[layer.kernel].value.shape[layer.out_axis]
        if size == 0:
            continue
        if size not in delta:
            raise _protocol_error(model, f"the output width of {layer.name} changed by {size}, which no "
                                         "widths entry (or tie group of entries) accounts for")
        grown.setdefault(int(size) - 1, []).append(layer)
    unused = [i for i, g in enumerate(group) if g not in grown]
    if unused:
        raise _protocol_error(model, f"widths[{unused[0]}] sets the output width of no conv")
    controls = []
    for i, g in enumerate(group):
        kernels = grown[g]
        if len({tuple(graph.roots(leaves[k.kernel].axes[k.out_axis])) for k in kernels}) != 1:
            raise _protocol_error(model, f"widths[{i}] sets the widths of convs that are not added together")
        rank = group[:i].count(g)  # tied entries and their convs pair up in forward order
        own = kernels[rank] if len(kernels) == group.count(g) else kernels[0]
        controls.append([own.kernel] + [k.kernel for k in kernels if k is not own])
    return controls


def layers_by_kernel(layers) -> dict:
    return {layer.kernel: layer for layer in layers}


def check_shapes(model, sliced: list[np.ndarray], paths, init_shapes) -> None:
    """The sliced variables must be exactly what the pruned model creates."""
    shapes = init_shapes(model)
    if len(shapes) != len(sliced):
        raise ValueError(f"prune: the pruned model {type(model).__name__}(widths={model.widths}) creates "
                         f"{len(shapes)} variables, the sliced ones are {len(sliced)}")
    for path, shape, value in zip(paths, shapes, sliced, strict=True):
        if tuple(shape) != value.shape:
            raise ValueError(
                f"prune: slicing gave {'/'.join(path)} the shape {value.shape} but the pruned model "
                f"{type(model).__name__}(widths=...) creates {tuple(shape)}; the model's widths do not "
                "follow the width protocol (see palm_jax.pruning)"
            )


class LeafMismatch(ValueError):
    """The variables do not have the leaves the model creates."""


def abstract_shapes(model, probe, paths) -> list[tuple[int, ...]]:
    """Leaf shapes of `model.init` on a one-example probe, in the order of `paths`."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), probe[:1])
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    )[0]:
        found[tuple(p.key for p in path)] = tuple(leaf.shape)
    if set(found) != set(paths):
        missing = sorted("/".join(p) for p in set(paths) ^ set(found))
        raise LeafMismatch(f"prune: the variables and {type(model).__name__}.init differ in the leaves "
                         f"{missing[:3]}; pass the variables of this model")
    return [found[p] for p in paths]
