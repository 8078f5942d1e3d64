"""One experiment from data to report: train (or resume), read the sparse scales, prune, fine-tune, report.

run_dir/config.json              the TrainConfig, written when training starts (checked against on --resume)
run_dir/checkpoints/<epoch>/     Orbax, last k + best; run_dir/checkpoints_finetune/ for fine-tuning (set
                                 aside as checkpoints_finetune.stale when training redoes an epoch)
run_dir/metrics.jsonl            one record per epoch (+ run_dir/tensorboard/ when tensorboard is installed)
run_dir/pruned/                  the pruned (and fine-tuned) model, `palm_jax.load_pruned`-able
run_dir/report.json, report.md   accuracies, channels, params, FLOPs, seconds; run_dir/plots/*.png
"""

import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import palm_jax.pruning as pruning
from palm_jax.data import NUM_CLASSES, Dataset, load_dataset, synthetic_dataset
from palm_jax.data.sources import first_train_images
from palm_jax.recalibrate import recalibrate_bn
from palm_jax.train import outputs, report, sharding
from palm_jax.train.checkpoint import Checkpoints, set_aside
from palm_jax.train.config import PHASE_NAMES, PHASES, ConfigError, TrainConfig
from palm_jax.train.loop import Inputs, fit, steps_per_epoch
from palm_jax.train.metrics import MetricsWriter, keep_records, read_metrics
from palm_jax.train.state import (
    Apply,
    build_model,
    create_train_state,
    float32_apply,
    init_variables,
    make_optimizer,
    sparse_params,
)
from palm_jax.train.step import evaluate, to_device, to_eval_batches
from palm_jax.utils import abstract_variables

CONFIG_FILE = "config.json"
FOLDS = ("exact", "closest", "none")


class RunDirError(ConfigError):
    """The run directory does not fit the request (e.g. checkpoints present without --resume)."""


def load_data(cfg: TrainConfig) -> Dataset:
    """The dataset `cfg` names as host uint8 arrays: generated, an npz folder, or the downloaded splits."""
    if cfg.dataset == "synthetic":
        return synthetic_dataset(
            num_train=cfg.synthetic_images, num_eval=max(cfg.synthetic_images // 4, 100), seed=cfg.seed
        )
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    try:  # the message names the setting as the user or the recipe made it (ConfigError.explain)
        return first_train_images(dataset, cfg.train_images, asked="{train_images}", source=cfg.data_dir)
    except ValueError as err:
        raise ConfigError(str(err), {"train_images": cfg.train_images}) from None


def checkpoint_dir(run_dir: Path, phase: str) -> Path:
    """run_dir/checkpoints for training, run_dir/checkpoints_<phase> for the others."""
    return Path(run_dir) / ("checkpoints" if phase == "train" else f"checkpoints_{phase}")


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> list[str]:
    """Check that `run_dir` may hold the run `cfg`; writes nothing (`record_config` does, when training
    starts). A folder with checkpoints is a run: continued only with `resume` and the same training options
    (paths compared resolved); returns the settings of what follows training that changed (AFTER_TRAINING:
    those phases are redone). Without checkpoints nothing ran: a config.json left by an attempt that failed
    before its first step binds nothing. A folder holding other files than a run's is refused."""
    has_checkpoints = any(any(checkpoint_dir(run_dir, phase).glob("[0-9]*")) for phase in PHASES)
    if not has_checkpoints:
        ours = lambda name: name in outputs.RUN_ENTRIES or name.startswith(("checkpoints", "."))
        foreign = sorted(p.name for p in run_dir.iterdir() if not ours(p.name)) if run_dir.is_dir() else []
        if foreign:
            raise RunDirError(f"{run_dir} holds other files than a run ({', '.join(foreign[:3])}); choose "
                              "a new or empty --out")
        return []
    if not resume:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        return []
    saved = TrainConfig.load(config_path)
    mismatch = cfg.resume_mismatch(saved)
    if mismatch:
        raise RunDirError(
            f"--resume: {run_dir} was run with other options ({'; '.join(mismatch)}); "
            "pass the same options or choose another --out"
        )
    return cfg.changed_fields(saved)


def set_aside_phases(run_dir: Path, phases, why: str, log) -> None:
    """Phases made from what is now redone: their checkpoints moved to `checkpoints_<phase>.stale`, their
    metrics dropped (metrics.jsonl stays in the order the run computes)."""
    if not phases:
        return
    keep_records(run_dir, lambda record: record["phase"] not in phases)
    for phase in phases:
        stale = checkpoint_dir(run_dir, phase)
        if stale.is_dir() and any(stale.iterdir()) and jax.process_index() == 0:
            moved = set_aside(stale, "stale")
            log(f"note: {why}: moved the {PHASE_NAMES[phase]} checkpoints to {moved.name}")


def record_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Create `run_dir` and write config.json: the run has started (see `prepare_run_dir`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)


def run_experiment(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    callback: Callable[[int, int], None] | None = None,
    on_data: Callable[[Dataset], None] | None = None,
    log=print,
) -> Path:
    """Run (or resume) the experiment `cfg` in `run_dir`; returns the path of report.json.

    `on_data(dataset)` runs once the data is loaded, before training; `callback(epoch, step)` after every
    chunk of steps (see `fit`).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    build_model(cfg, NUM_CLASSES.get(cfg.dataset, 10))  # a bad depth or widths fails here, before any work
    changed = prepare_run_dir(cfg, run_dir, resume)
    dataset = load_data(cfg)
    if len(dataset.train_labels) < cfg.batch_size:
        raise ConfigError(f"{{batch_size}} exceeds the {len(dataset.train_labels):,} training images",
                          {"batch_size": cfg.batch_size})
    inputs = Inputs(to_device(dataset.train_images, dataset.train_labels),
                    to_eval_batches(dataset.eval_images, dataset.eval_labels, cfg.eval_batch_size),
                    dataset.preprocess)
    if jax.device_count() > 1:  # data parallel over every device
        mesh = sharding.make_mesh()
        sharding.check_batch_size(cfg.batch_size, mesh)
        inputs = inputs._replace(train=sharding.replicate(inputs.train, mesh),
                                 eval=sharding.shard_eval(inputs.eval, mesh), mesh=mesh)
    log(
        f"data: {dataset.name} ({' + '.join(dataset.train_splits)}), {len(dataset.train_labels)} train / "
        f"{inputs.eval.size} {dataset.eval_split} images; model: {cfg.model}-{cfg.depth}; method: "
        f"{cfg.method}; device: {jax.devices()[0].platform}"
    )
    if on_data is not None:
        on_data(dataset)

    model = build_model(cfg, dataset.num_classes)
    variables = init_variables(model, cfg.seed, inputs.train.images.shape[1:])

    in_fit = 0.0  # seconds of this invocation spent in train_phase (its epochs are in the metrics)

    def train(phase, model, variables):
        nonlocal in_fit
        start = time.perf_counter()
        try:
            return train_phase(cfg, phase, model, variables, inputs, run_dir, resume=resume,
                               callback=callback, log=log)
        finally:
            in_fit += time.perf_counter() - start

    record_config(cfg, run_dir)
    if changed:
        set_aside_phases(run_dir, PHASES[1:], f"{', '.join(changed)} changed", log)
    state = train("train", model, variables)

    # the trained model's accuracy is the last epoch's eval (same params, same split)
    accuracy = {
        "trained": read_metrics(run_dir, "train")[-1]["eval_accuracy"],
        "sparse": None,
        "finetuned": None,
    }
    result, scores = prune_trained(cfg, state, dataset, inputs, accuracy["trained"])
    accuracy.update(scores)
    if cfg.finetune_epoch_count:
        tuned = train("finetune", result.model.clone(dtype=cfg.compute_dtype), result.variables)
        result = result._replace(variables=tuned.variables())
        accuracy["finetuned"] = evaluate(tuned.apply_fn, tuned.variables(), inputs.eval, inputs.preprocess)[
            "accuracy"]
    save_pruned(run_dir / "pruned", result)

    records = read_metrics(run_dir)
    xi = sparse_params(state, cfg.method) if cfg.method.keeps_xi else None
    try:
        from palm_jax.train import plots  # matplotlib: optional on a bare accelerator machine
    except ImportError as err:
        log(f"plots skipped: {err}")
    else:
        plots.write_all(run_dir / "plots", state.params, xi, result.report, records, dataset.eval_split,
                        accuracy)
    # epochs count with the time they took, also those of earlier invocations when resumed
    seconds = {
        "train": sum(r["seconds"] for r in records if r["phase"] == "train"),
        "total": time.perf_counter() - started - in_fit + sum(r["seconds"] for r in records),
    }
    summary = report.build(cfg, dataset, accuracy, result.report, records, seconds=seconds)
    return report.write(run_dir, summary)


def train_phase(
    cfg: TrainConfig,
    phase: str,
    model,
    variables: dict,
    inputs: Inputs,
    run_dir: Path,
    *,
    resume: bool = False,
    callback: Callable[[int, int], None] | None = None,
    log=print,
):
    """Train `model` from `variables` for phase `phase` of the run `cfg` (its settings: `cfg.for_phase`),
    resuming from this phase's latest intact checkpoint if asked (and saying so); returns the final state.

    A phase that (re)trains any epoch makes what the later phases computed from it stale: their checkpoints
    are moved aside (`checkpoints_<phase>.stale`) and their metrics dropped, so they run again after it."""
    phase_cfg = cfg.for_phase(phase)
    tx = make_optimizer(phase_cfg, steps_per_epoch(int(inputs.train.labels.shape[0]), cfg.batch_size))
    state = create_train_state(model, tx, variables, phase_cfg.seed)
    checkpoints = Checkpoints(checkpoint_dir(run_dir, phase), cfg.keep_checkpoints)
    start = 0
    if resume and checkpoints.latest_epoch() is not None:
        state, meta = checkpoints.restore(state)
        start = int(meta["epoch"])
        log(f"resuming {PHASE_NAMES[phase]} from epoch {start} of {phase_cfg.epochs} "
            f"({checkpoints.directory / str(start)})")
    later = PHASES[PHASES.index(phase) + 1:] if start < phase_cfg.epochs else ()
    set_aside_phases(run_dir, later, f"{PHASE_NAMES[phase]} runs again from epoch {start + 1}", log)
    if inputs.mesh is not None:
        state = sharding.replicate(state, inputs.mesh)
    metrics = MetricsWriter(run_dir, keep_until=(phase, start))
    meta = {"phase": phase, "config": cfg.to_dict()}
    try:
        return fit(state, inputs, phase_cfg, checkpoints, metrics, phase=phase, start_epoch=start, meta=meta,
                   callback=callback)
    finally:
        metrics.close()
        checkpoints.close()


# Seconds of timed rounds of the unpruned and the pruned model's eval forward pass (batch 1 and the
# throughput batch, `palm_jax.deploy.measure_latency`), compilation and warm-up aside: a few seconds per run.
LATENCY_BUDGET_S = 2.0
RECALIBRATION_IMAGES = ("the first {n} training images in the order of a permutation seeded by --seed, "
                        "un-augmented, normalised as at evaluation, in batches of {batch_size} (the training "
                        "batch size, or all in one batch when fewer)")


def prune_trained(cfg: TrainConfig, state, dataset: Dataset, inputs: Inputs, trained_accuracy=None,
                  fold: str = "exact"):
    """Prune a trained state the way `cfg` says (its sparse scales: xi for prox; `cfg.prune_percent` of the
    channels when set), re-estimate the pruned model's BatchNorm statistics on `cfg.recalibrate_images`
    training images of `dataset` (`recalibrate`) and score it on `inputs.eval`:
    (PruneResult with the recalibrated variables, {"sparse": acc or None, "pruned": acc, "recalibrated": acc
    or None}). The prune report gains "latency" (`palm_jax.deploy.measure_latency` of the unpruned and the
    pruned model) and "recalibration" ({images, batch_size, seconds, which}, None when off).
    `fold`: "exact" (carriers where padding needs them), "closest" (the closest per-channel constant) or
    "none" (slice only)."""
    if fold not in FOLDS:
        raise ConfigError(f"--fold must be one of {', '.join(FOLDS)}; got {fold!r}")
    top1 = lambda fn, variables: evaluate(fn, variables, inputs.eval, inputs.preprocess)["accuracy"]
    # pruned and checked in float32 whatever the compute dtype: the deviation is then the pruning's alone
    model, sparse = float32_apply(state.apply_fn).model, state.variables(sparse_params(state, cfg.method))
    keeps_xi = cfg.method.keeps_xi
    scores = {"sparse": top1(state.apply_fn, sparse) if keeps_xi else None}
    probe = inputs.preprocess.eval(dataset.eval_images[:8])  # real images for the logit-deviation check
    result = pruning.prune(
        model, sparse, percent=cfg.prune_percent, probe=probe, fold=fold != "none", exact=fold == "exact",
        latency={"budget_s": LATENCY_BUDGET_S},
    )
    unchanged = result.model == model  # same widths and selections: nothing removed, the sparse model itself
    known = (scores["sparse"] if keeps_xi else trained_accuracy) if unchanged else None
    scores["pruned"] = known if known is not None else top1(Apply(result.model), result.variables)
    result, scores["recalibrated"] = recalibrate(cfg, result, dataset.train_images, inputs.preprocess, top1)
    return result, scores


def recalibrate(cfg: TrainConfig, result, train_images: np.ndarray, preprocess, top1):
    """`result` with its BatchNorm statistics re-estimated by `palm_jax.recalibrate_bn` on training images
    only (RECALIBRATION_IMAGES; none when `cfg.recalibrate_images` is 0), and its accuracy `top1(apply,
    variables)` (None when off); result.report["recalibration"] says what was done."""
    if not cfg.recalibrate_images:
        result.report["recalibration"] = None
        return result, None
    count = min(cfg.recalibrate_images, len(train_images))
    batch_size = min(cfg.batch_size, count)  # whole batches of the training batch size, or one smaller one
    order = np.random.default_rng(cfg.seed).permutation(len(train_images))[: count - count % batch_size]
    start = time.perf_counter()
    variables = jax.block_until_ready(recalibrate_bn(
        result.model, result.variables, train_images[order], batch_size=batch_size,
        preprocess=preprocess.eval))
    seconds = time.perf_counter() - start
    result.report["recalibration"] = {
        "images": int(len(order)), "batch_size": batch_size, "seconds": round(seconds, 2),
        "which": RECALIBRATION_IMAGES.format(n=len(order), batch_size=batch_size),
    }
    result = result._replace(variables=variables)
    return result, top1(Apply(result.model), variables)


def save_pruned(path: Path, result, *, replace: bool = True) -> None:
    """The pruned model into `path`: filled when absent or empty, a previous pruned model replaced when
    `replace` (a rerun rewrites its own output); anything else there is refused (`outputs.write_pruned`)."""
    outputs.write_pruned(path, result, replace=replace)


def load_trained(run_dir: Path, epoch: int | None = None, *, best: bool = False, image_shape=(32, 32, 3)):
    """(config, train state, epoch) of a run's checkpoint: `epoch`, else the best or the latest one."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir / CONFIG_FILE)
    model = build_model(cfg, NUM_CLASSES.get(cfg.dataset, 10))
    checkpoints = Checkpoints(checkpoint_dir(run_dir, "train"), read_only=True)
    if epoch is None:
        epoch = checkpoints.best_epoch() if best else checkpoints.latest_epoch()
    tx = make_optimizer(cfg, steps_per_epoch=1)  # the schedule's length changes no array of the state
    template = jax.eval_shape(lambda v: create_train_state(model, tx, v, cfg.seed),
                              abstract_variables(model, image_shape))
    state, _ = checkpoints.restore(template, epoch)
    checkpoints.close()
    return cfg, state, epoch


def accuracy_of(model, variables, images: np.ndarray, labels: np.ndarray, batch_size: int,
                preprocess) -> float:
    """Top-1 accuracy (float32) of `model` with `variables` on host arrays preprocessed by `preprocess` (the
    dataset's `Preprocess`), for the eval command."""
    eval_data = to_eval_batches(images, labels, batch_size)
    return evaluate(Apply(model), variables, eval_data, preprocess)["accuracy"]
