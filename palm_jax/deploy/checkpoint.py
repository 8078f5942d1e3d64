"""Export what `palm_jax.cli eval` evaluates: a run's trained checkpoint, one epoch of it, or a pruned model.

    export_checkpoint("runs/demo/pruned", "deploy/demo")
    python -m palm_jax.cli export runs/demo/pruned --out deploy/demo          # the same, from the shell

The model is exported in float32 with the training pipeline's input normalisation (`palm_jax.data.normalize`
with CIFAR_MEAN / CIFAR_STD, what `eval` applies), so that the artifact's logits are `eval`'s. A run directory
exports its trained (dense) network, as `eval` evaluates it; the pruned one to serve is RUN/pruned.
"""

from pathlib import Path

from palm_jax.deploy.export import ExportError, check_out_dir, export_model

DEFAULT_INPUT_SHAPE = (32, 32, 3)  # what `load_trained` builds a run's model for


def load_checkpoint(checkpoint, which: str = "latest") -> tuple:
    """(model, variables, facts) of CHECKPOINT as `eval` reads it: a pruned model (`save_pruned` directory),
    an epoch checkpoint `RUN/checkpoints/<epoch>`, or a run directory (its `which` checkpoint: latest or
    best). `facts`: the source (kind, checkpoint, run, epoch, dataset), input shape, FLOPs when known.
    The model computes in float32 (eval's dtype)."""
    from palm_jax.pruning import load_pruned
    from palm_jax.pruning.io import META as PRUNED_META
    from palm_jax.train import TrainConfig
    from palm_jax.train.experiment import CONFIG_FILE, load_trained
    from palm_jax.train.state import Apply, float32_apply

    path = Path(checkpoint)
    if which not in ("latest", "best"):
        raise ExportError(f"export: which must be 'latest' or 'best', got {which!r}")
    if not path.exists():
        raise ExportError(f"export: checkpoint {path} does not exist")
    pruned = (path / PRUNED_META).is_file()
    if path.name.isdigit() and path.parent.name.startswith("checkpoints_"):
        raise ExportError(f"export: {path} is a fine-tuning checkpoint; export {path.parents[1] / 'pruned'} "
                          "(the fine-tuned pruned model) instead")
    epoch = int(path.name) if path.name.isdigit() and path.parent.name == "checkpoints" else None
    run_dir = path.parents[1] if epoch is not None else (path.parent if pruned else path)
    has_config = (run_dir / CONFIG_FILE).is_file()
    if not (pruned or has_config):
        raise ExportError(f"export: {path} is neither a run directory (no {CONFIG_FILE}) nor a pruned model "
                          f"(no {PRUNED_META})")
    facts = {"checkpoint": str(path.absolute()), "run": str(run_dir.absolute()) if has_config else None,
             "dataset": TrainConfig.load(run_dir / CONFIG_FILE).dataset if has_config else None}
    if pruned:
        model, variables, report = load_pruned(path)
        facts.update(kind="pruned", input_shape=tuple(report["input_shape"]), flops=report.get("flops_after"))
    else:
        _, state, epoch = load_trained(run_dir, epoch, best=which == "best", image_shape=DEFAULT_INPUT_SHAPE)
        model, variables = state.apply_fn.model, state.variables()
        facts.update(kind="trained", epoch=epoch, input_shape=DEFAULT_INPUT_SHAPE, flops=None)
    return float32_apply(Apply(model)).model, variables, facts


def export_checkpoint(checkpoint, out_dir, *, force: bool = False, which: str = "latest") -> Path:
    """`export_model` of what `load_checkpoint(checkpoint, which)` reads, with the training pipeline's
    normalisation and the checkpoint's FLOPs (computed when the checkpoint has none); returns `out_dir`."""
    from palm_jax.data import CIFAR_MEAN, CIFAR_STD
    from palm_jax.pruning.report import forward_flops

    out = check_out_dir(out_dir, force)  # before the (slow) checkpoint is read
    model, variables, facts = load_checkpoint(checkpoint, which)
    input_shape, flops = facts.pop("input_shape"), facts.pop("flops")
    if flops is None:
        flops = forward_flops(model, variables, input_shape)
    return export_model(model, variables, out, input_shape=input_shape, mean=CIFAR_MEAN, std=CIFAR_STD,
                        flops=flops, description=facts, force=force)
