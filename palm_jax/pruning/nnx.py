"""`prune` for Flax NNX modules: any module called as `model(x)`, no protocol.

    result = palm_jax.prune(model, probe=x)      # model: an nnx.Module whose BN scales hold the sparse values
    result.model                                  # a new module of the same class, smaller; `model` unchanged
    result.variables                              # nnx.state(result.model)

The module's state is split into the engine's leaves: every `nnx.Param` as ("params", *path) and every
`nnx.BatchStat` as ("batch_stats", *path), path being the NNX state path ("blocks", "0", "bn", "scale").
Other Variables (RNG state, a user's own Variable types) are no leaves: the trace reads them as constants,
so they stay as they are and every channel they touch is kept. The forward pass is traced on a copy in
eval mode (`Module.eval()`: BatchNorm uses its running statistics, Dropout is deterministic) over (leaves,
probe), and analysed by the engine once per (module structure, shapes, probe shape).

The rebuild copies the module graph with the sliced arrays and sets what each layer reads at call time
(`nnx_layers.resize`): nnx.Conv (depthwise and grouped too), nnx.Linear and nnx.BatchNorm are resized;
every nnx.BatchNorm may gather its input (it becomes an `nnx_layers.GatherBatchNorm` reading
`x[..., indices]` where it keeps other channels than its stream keeps). Any other module holding Params or
BatchStats itself (a user's layer, nnx.LayerNorm / GroupNorm, a masked conv) keeps its variables whole and
the channels they touch; `report["left_alone"]` lists them and why. The rebuilt module is traced and
checked against the sparse one exactly as for Linen (`report.check`, the same tolerance and refusal).
"""

import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palm_jax.deploy.latency import add_latency
from palm_jax.pruning import engine, flops, nnx_layers
from palm_jax.pruning import report as reporting
from palm_jax.pruning.api import (
    TOLERANCE,
    Analysed,
    PruneResult,
    cached,
    check_arguments,
    error_line,
    make_jaxpr,
)

COLLECTIONS = ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats"))


class Split:
    """A module's graph and flat state, with the engine's view of it: which state entries are leaves
    (`index`), their `paths` and `values`."""

    def __init__(self, model):
        self.graphdef, state = nnx.split(model)
        self.flat = list(nnx.to_flat_state(state))
        self.index, self.paths = [], []
        for i, (path, variable) in enumerate(self.flat):
            collection = next((name for kind, name in COLLECTIONS if isinstance(variable, kind)), None)
            if collection is not None:
                self.index.append(i)
                self.paths.append((collection, *(str(p) for p in path)))
        self.values = [np.asarray(self.flat[i][1][...]) for i in self.index]

    def merge(self, values):
        """The module with the leaves replaced by `values` (arrays or tracers)."""
        flat = list(self.flat)
        for i, value in zip(self.index, values, strict=True):
            path, variable = flat[i]
            flat[i] = (path, variable.replace(value))
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def others(self):
        """(path, Variable) of the state entries that are no leaves."""
        leaves = set(self.index)
        return [entry for i, entry in enumerate(self.flat) if i not in leaves]


def _evaluation(model) -> Split:
    copy = nnx.clone(model)
    copy.eval()
    return Split(copy)


def trace(split: Split, probe, inline=False):
    """The closed jaxpr of the eval-mode forward pass over (leaves, probe) (`inline`: see
    `api.make_jaxpr`)."""
    return make_jaxpr(lambda leaves, x: split.merge(leaves)(x), split.values, probe, inline=inline)


def _left_alone(modules: dict, split: Split):
    """(leaf indices kept whole, [{module, class, why}]) for the modules the pruner does not resize."""
    fixed, listed = set(), {}
    for i, path in enumerate(split.paths):
        owner = "/".join(path[1:-1])
        why = nnx_layers.kept_whole(modules[owner]) if owner in modules else "not held by a module"
        if why is not None:
            fixed.add(i)
            kind = type(modules.get(owner)).__name__
            listed.setdefault(owner, {"module": owner, "class": kind, "why": why})
    for path, variable in split.others():
        if not isinstance(variable, nnx.RngState):  # RNG keys and counts touch no channel
            name = nnx_layers.path_name(path)
            listed[name] = {"module": name, "class": type(variable).__name__,
                            "why": "not an nnx.Param or nnx.BatchStat: read as a constant"}
    return fixed, list(listed.values())


def _digest(split: Split) -> str:
    """The values the trace reads as constants (the non-leaf Variables): part of the cache key."""
    digest = hashlib.sha1()
    for path, variable in split.others():
        value = variable[...]
        if not hasattr(value, "dtype"):
            digest.update(repr((path, value)).encode())
            continue
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        digest.update(repr(path).encode() + np.asarray(value).tobytes())
    return digest.hexdigest()


def _analysed(model, split: Split, probe):
    """(Analysed, left_alone) of one module structure and probe shape; controls: the resized conv / Dense
    kernels in forward order."""
    modules = nnx_layers.named_modules(model)
    fixed, left_alone = _left_alone(modules, split)
    try:
        closed = trace(split, probe)
    except Exception as err:
        raise ValueError(
            f"prune: {type(model).__name__}(probe) fails in eval mode on the probe batch of shape "
            f"{tuple(probe.shape)} ({error_line(err)}); pass probe= a batch of the input the module is built "
            "for, the module called as model(x)") from err
    gathering = lambda name: type(modules.get(name)) in nnx_layers.GATHERING
    structure = engine.analyse(split.paths, split.values, closed, gathering=gathering, fixed=fixed)
    controls = [[layer.kernel] for layer in structure.layers
                if layer.kernel not in fixed and type(modules.get(layer.name)) in nnx_layers.LAYERS]
    return Analysed(closed, structure, controls, flops.count(closed, len(split.values), split.paths),
                    inline=flops.inlining_keeps_count(closed.jaxpr)), left_alone


def prune(model, variables=None, *, probe, threshold=0.0, percent=None, min_channels=1, fold=True, exact=True,
          tolerance=TOLERANCE, latency=False) -> PruneResult:
    """`palm_jax.prune` for an `nnx.Module` (see the module docstring; the arguments are `prune`'s)."""
    check_arguments(threshold, percent, min_channels, tolerance)
    if probe is None:
        raise ValueError("prune: an NNX module needs probe=, a batch of the input it is built for (e.g. "
                         "probe=images[:8]): its layers have fixed sizes, so no default input fits")
    probe = np.asarray(probe)
    clock = time.perf_counter()
    source = nnx.clone(model)
    if variables is not None:
        try:
            nnx.update(source, variables)
        except Exception as err:
            raise ValueError(f"prune: variables is not a state of this {type(model).__name__} "
                             f"({error_line(err)}); pass an nnx.State of it, or None") from err
    if not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(source)):
        raise ValueError(f"prune: {type(model).__name__} has no nnx.BatchNorm; channels are removed by their "
                         "BatchNorm scales (train them with palm_jax.palm_prox)")
    split = _evaluation(source)
    key = ("nnx", split.graphdef, tuple(split.paths), tuple((v.shape, v.dtype.str) for v in split.values),
           _digest(split), probe.shape, probe.dtype.str)
    analysed, left_alone = cached(key, lambda: _analysed(source, split, probe))
    seconds = {"trace": time.perf_counter() - clock}
    structure, values = analysed.structure, split.values
    plan = structure.plan(values, {k for (k,) in analysed.controls}, threshold=threshold, percent=percent,
                          min_channels=min_channels, fold=fold, exact=exact)
    seconds.update(plan.seconds)
    clock = time.perf_counter()
    pruned = Split(source).merge([jnp.asarray(v) for v in plan.values])
    nnx_layers.resize(pruned, plan.selections)
    rebuilt = _evaluation(pruned)
    try:
        if rebuilt.paths != split.paths:
            raise ValueError("the state paths changed")
        pruned_closed = trace(rebuilt, probe, inline=analysed.inline)
    except Exception as err:
        raise ValueError(f"prune: the rebuilt {type(model).__name__} does not run on the sliced variables "
                         f"({error_line(err)}); a layer reads its channel counts from attributes the pruner "
                         "does not know of (see report['left_alone'] for what it leaves alone)") from err
    check = reporting.check(analysed.closed, values, plan, pruned_closed, probe)
    seconds["check"] = time.perf_counter() - clock
    if fold and exact and check["relative_deviation"] > tolerance:
        raise ValueError(reporting.refusal(type(model).__name__, plan, check, tolerance, None, cause=(
            "a layer likely computes with its channel count (e.g. x.shape[-1]) beyond shapes")))
    report = reporting.summary(
        plan, structure, [kernels[0] for kernels in analysed.controls], probe, check,
        flops_before=analysed.flops, flops_after=flops.count(pruned_closed, len(values), split.paths),
        percent=percent, min_channels=int(min_channels), tolerance=float(tolerance), seconds=seconds,
    )
    report["left_alone"] = left_alone
    result = PruneResult(pruned, nnx.state(pruned), report)
    return add_latency(result, (source, None), latency, probe.shape[1:])
