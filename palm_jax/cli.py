"""Command line: `python -m palm_jax.cli train|eval|prune|export ...`.

    train  --recipe NAME (experiments/recipes.py; default: the paper recipe of --model/--method), any option
           overriding it; writes the run directory (--out) and prints `report: <path>` last.
    eval   CHECKPOINT: a run directory, one of its epoch checkpoints, or a pruned model (run/pruned); prints
           the top-1 accuracy on --npz FILE, --data-dir DIR (its test split, else its validation hold-out) or
           the TFDS test split, and writes it as JSON.
    prune  RUN_DIR: prunes the run's checkpoint again (--fold exact|closest|none, --which latest|best) into
           RUN_DIR/pruned-<fold> (or --out) with prune.json: accuracies, channels, params, FLOPs, deviation.
    export CHECKPOINT --out DIR [--force]: what `eval` evaluates, as a jax.export artifact served by
           `palm_jax.load_exported(DIR)` without the model's code (palm_jax/deploy).

A user error (bad option, missing data, foreign checkpoint) prints one line and exits with status 2; a
diverged run (NaN or infinite loss) prints the step and exits with 3; an interrupted one exits with 130 and
can be continued with --resume. Set PALM_JAX_DEBUG=1 to get tracebacks instead.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
RECIPES_FILE = Path(__file__).resolve().parents[1] / "experiments" / "recipes.py"
TRAIN_OPTIONS = {  # option -> (TrainConfig field, type, help)
    "--model": ("model", str, "vgg, resnet (PreResNet) or densenet"),
    "--depth": ("depth", int, "network depth (VGG 11/13/16/19, PreResNet 9n+2, DenseNet 3n+4)"),
    "--widths": ("widths", None, "comma-separated output width of every conv (a narrow model)"),
    "--dataset": ("dataset", str, "cifar10, cifar100, svhn or synthetic (generated images)"),
    "--method": ("method", str, "prox (PALM), ns (Network Slimming), ista (soft threshold) or baseline"),
    "--l1": ("l1", float, "sparsity weight on sum |BN scale|"),
    "--beta": ("beta", float, "PALM coupling weight (prox)"),
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "training batch size"),
    "--lr": ("lr", float, "initial learning rate (divided by 10 at 50%% and 75%% of training)"),
    "--warmup-epochs": ("warmup_epochs", float, "reach --lr linearly over this many epochs (default 0)"),
    "--train-images": ("train_images", int, "use only the first N training images (a quick look)"),
    "--synthetic-images": (
        "synthetic_images",
        int,
        "number of generated training images (--dataset synthetic)",
    ),
    "--data-dir": ("data_dir", str, "folder with train.npz [test.npz] (default: TensorFlow Datasets)"),
    "--seed": ("seed", int, "seed of initialisation, data order and augmentation"),
    "--finetune-epochs": ("finetune_epochs", int, "fine-tune the pruned model for N epochs (0: none)"),
    "--finetune-lr": ("finetune_lr", float, "initial learning rate of fine-tuning (default: --lr)"),
    "--prune-percent": (
        "prune_percent",
        float,
        "prune this global %% of channels by |scale| (default: the "
        "recipe's; prox/ista prune exactly the zero channels)",
    ),
    "--dtype": ("dtype", str, "compute dtype float32 or bfloat16 (params, BN stats and xi stay float32)"),
    "--steps-per-dispatch": (
        "steps_per_dispatch",
        int,
        "train steps per compiled call (default: 1 on CPU, up to 100 on accelerators)",
    ),
}


class UsageError(Exception):
    """A bad command line or user input: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def load_recipes() -> dict:
    if not RECIPES_FILE.is_file():
        raise UsageError(
            f"recipes not found at {RECIPES_FILE}: run from a palm_jax checkout, or pass every option"
        )
    spec = importlib.util.spec_from_file_location("palm_jax_recipes", RECIPES_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="palm_jax", description="Proximal network slimming: train, prune, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser("train", help="train, prune, (fine-tune) and report one experiment")
    train.add_argument("--recipe", help="a recipe of experiments/recipes.py, e.g. cifar10-vgg19 or demo")
    for option, (field, kind, help_text) in TRAIN_OPTIONS.items():
        train.add_argument(option, dest=field, type=_widths if field == "widths" else kind, help=help_text)
    train.add_argument("--out", help="run directory (default: runs/<recipe or model-method-dataset>)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="top-1 accuracy of a saved checkpoint (trained or pruned)")
    evaluate.add_argument(
        "checkpoint", help="a run directory, one of its checkpoints/<epoch>, or a pruned model"
    )
    evaluate.add_argument("--dataset", help="dataset name (default: the run's)")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--npz", help="an npz file of JPEGs in the format of --data-dir's files")
    source.add_argument("--data-dir", help="folder with train.npz [test.npz]: its eval split")
    evaluate.add_argument(
        "--which",
        choices=("latest", "best"),
        default="latest",
        help="which checkpoint of a run directory (default: latest)",
    )
    evaluate.add_argument("--batch-size", type=int, default=500, help="eval batch size")
    evaluate.add_argument("--out", help="JSON file for the result (default: eval.json beside the checkpoint)")
    evaluate.set_defaults(func=cmd_eval)

    reprune = commands.add_parser("prune", help="prune a trained run's checkpoint again, e.g. another --fold")
    reprune.add_argument("run_dir", help="a run directory written by `train`")
    reprune.add_argument("--which", choices=("latest", "best"), default="latest", help="which checkpoint")
    reprune.add_argument(
        "--fold",
        choices=("exact", "closest", "none"),
        default="exact",
        help="constants of removed channels: exact (carrier channels next to padding, the default), closest "
        "(the closest per-channel constant, no extra channel) or none (slice only)",
    )
    reprune.add_argument("--out", help="folder for the pruned model (default: RUN_DIR/pruned-<fold>)")
    reprune.set_defaults(func=cmd_prune)

    export = commands.add_parser("export", help="write a checkpoint as a jax.export artifact to serve")
    export.add_argument("checkpoint", help="a run directory, its checkpoints/<epoch>, or a pruned model")
    export.add_argument("--out", required=True, help="folder for model.jax, weights.npz, exported.json")
    export.add_argument("--which", choices=("latest", "best"), default="latest", help="which checkpoint")
    export.add_argument("--force", action="store_true", help="replace the export files in a non-empty --out")
    export.set_defaults(func=cmd_export)
    return parser


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return widths


def resolve_config(args) -> tuple[dict, str]:
    """TrainConfig fields from the recipe (or the paper recipe) overridden by the options given; run name."""
    recipes = load_recipes()
    given = {
        field: getattr(args, field)
        for field, _, _ in TRAIN_OPTIONS.values()
        if getattr(args, field) is not None
    }
    if args.recipe is not None:
        if args.recipe not in recipes.RECIPES:
            raise UsageError(f"--recipe {args.recipe!r} is not one of: {', '.join(recipes.RECIPES)}")
        recipe = recipes.RECIPES[args.recipe]
        values = recipe(given["method"]) if "method" in given else recipe()
        name = args.recipe
    else:
        model = given.get("model", "vgg")
        if model not in recipes.DEPTH:
            raise UsageError(f"--model must be one of {', '.join(recipes.DEPTH)}; got {model!r}")
        values = recipes.paper(
            model, given.get("depth"), given.get("method", "prox"), given.get("dataset", "cifar10")
        )
        name = f"{values['dataset']}-{model}{values['depth']}-{values['method']}"
    values.update(given)
    if values.get("finetune_epochs") == recipes.SAME_AS_EPOCHS:
        values["finetune_epochs"] = values["epochs"]
    return values, name


def cmd_train(args) -> int:
    from palm_jax.train import TrainConfig, run_experiment
    from palm_jax.train.sharding import initialize_distributed

    initialize_distributed()  # multi-host: joins the other processes; one process: no-op

    values, name = resolve_config(args)
    cfg = TrainConfig.from_dict(values)
    out = Path(args.out or Path("runs") / name)
    on_data = None if args.recipe == "demo" else (lambda dataset: warn_if_cpu(cfg, dataset))
    report_path = run_experiment(cfg, out, resume=args.resume, on_data=on_data)
    summary = json.loads(report_path.read_text())
    acc = {k: (f"{100 * v:.2f}%" if v is not None else "-") for k, v in summary["accuracy"].items()}
    print(
        f"accuracy ({summary['split']}): trained {acc['trained']}, sparse {acc['sparse']}, "
        f"pruned {acc['pruned']}, fine-tuned {acc['finetuned']}; "
        f"channels {summary['channels']['after']}/{summary['channels']['before']}"
        f", params {summary['params']['after']}/{summary['params']['before']}"
    )
    print(f"report: {report_path}")
    return 0


# Throughput of XLA:CPU per core (forward FLOPs as XLA counts them), from `make cifar10-vgg19 EPOCHS=1
# TRAIN_IMAGES=2000` on a 2-core machine: 1 epoch of 1,984 training + 5,000 eval images of VGG-19 (0.62 GFLOP
# forward) in 551 s. Only used to print an order of magnitude before a long CPU run.
CPU_FLOPS_PER_CORE = 6e9


def warn_if_cpu(cfg, dataset) -> None:
    """Without an accelerator, say so before training starts, with an estimated time; point to the demo."""
    import jax

    if jax.default_backend() != "cpu":
        return
    train, test = len(dataset.train_labels), len(dataset.eval_labels)
    seconds = estimate_cpu_seconds(cfg, train, test, dataset.train_images.shape[1:], dataset.num_classes)
    print(
        f"note: no accelerator found (JAX backend: cpu, {os.cpu_count()} cores): {cfg.epochs} epochs of "
        f"{train} "
        f"images are estimated at {_duration(seconds)} on this CPU; `make demo` shows the whole pipeline in "
        "minutes",
        file=sys.stderr,
        flush=True,
    )


def estimate_cpu_seconds(cfg, train_images: int, eval_images: int, image_shape, num_classes: int) -> float:
    """3 x forward FLOPs (forward + backward) per training image and 1 x per eval image, each epoch, plus the
    two evaluations after training (sparse, pruned), at CPU_FLOPS_PER_CORE per core."""
    import jax

    from palm_jax.pruning.report import forward_flops
    from palm_jax.train.state import build_model

    model = build_model(cfg, num_classes)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, *image_shape)), train=False)
    )
    flops = forward_flops(model, variables, tuple(image_shape))
    per_epoch = 3 * train_images + eval_images
    total = flops * ((cfg.epochs + cfg.finetune_epochs) * per_epoch + 2 * eval_images)
    return total / (CPU_FLOPS_PER_CORE * (os.cpu_count() or 1))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def cmd_eval(args) -> int:
    from palm_jax.data import NUM_CLASSES, load_dataset
    from palm_jax.data.sources import read_npz
    from palm_jax.pruning import load_pruned
    from palm_jax.train import TrainConfig
    from palm_jax.train.experiment import CONFIG_FILE, accuracy_of, load_data, load_trained
    from palm_jax.train.state import sparse_params

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0, got {args.batch_size}")
    pruned = (path / "pruned_model.json").is_file()
    epoch = int(path.name) if path.name.isdigit() and path.parent.name.startswith("checkpoints") else None
    run_dir = path.parents[1] if epoch is not None else (path.parent if pruned else path)
    cfg = TrainConfig.load(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    if cfg is None and not pruned:
        raise UsageError(
            f"{path} is neither a run directory (no {CONFIG_FILE}) nor a pruned model (no pruned_model.json)"
        )
    dataset = args.dataset or (cfg.dataset if cfg else None)
    if dataset is None:
        raise UsageError("--dataset is needed: this pruned model has no run config beside it")

    if args.npz:
        if dataset not in NUM_CLASSES:
            raise UsageError(f"--npz needs --dataset among {', '.join(NUM_CLASSES)}; got {dataset!r}")
        num_classes = NUM_CLASSES[dataset]
        images, labels = read_npz(args.npz, num_classes)
        split, source = "npz", args.npz
    else:
        if dataset == "synthetic" and cfg is not None:
            data, source = load_data(cfg), "synthetic"
        else:
            data_dir = args.data_dir or (cfg.data_dir if cfg and cfg.dataset == dataset else None)
            data, source = load_dataset(dataset, data_dir), data_dir or "tfds"
        images, labels, split, num_classes = (
            data.eval_images,
            data.eval_labels,
            data.eval_split,
            data.num_classes,
        )

    result = {"checkpoint": str(path), "data": str(source), "split": split, "images": len(labels)}
    if pruned:
        model, variables, _ = load_pruned(path)
        result["accuracy"] = accuracy_of(model, variables, images, labels, args.batch_size)
    else:
        cfg, state, epoch = load_trained(
            run_dir, epoch, best=args.which == "best", image_shape=images.shape[1:]
        )
        result["epoch"] = epoch
        result["accuracy"] = accuracy_of(
            state.apply_fn.model, state.variables(), images, labels, args.batch_size
        )
        if cfg.method == "prox":
            sparse = state.variables(sparse_params(state, "prox"))
            result["accuracy_sparse"] = accuracy_of(
                state.apply_fn.model, sparse, images, labels, args.batch_size
            )
    out = Path(args.out) if args.out else (path if pruned else run_dir) / "eval.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"top-1 accuracy: {100 * result['accuracy']:.2f}% on {len(labels)} {split} images of {source}")
    print(f"eval: {out}")
    return 0


def cmd_prune(args) -> int:
    from palm_jax.train.experiment import CONFIG_FILE, load_data, load_trained, prune_trained, save_pruned
    from palm_jax.train.step import to_eval_batches

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"{run_dir} is not a run directory of `palm_jax train` (no {CONFIG_FILE})")
    cfg, state, epoch = load_trained(run_dir, best=args.which == "best")
    data = load_data(cfg)
    eval_data = to_eval_batches(data.eval_images, data.eval_labels, cfg.eval_batch_size)
    result, accuracy = prune_trained(cfg, state, data.eval_images, eval_data, fold=args.fold)
    out = Path(args.out) if args.out else run_dir / f"pruned-{args.fold}"
    save_pruned(out, result)
    r = result.report
    summary = {
        "run": str(run_dir), "epoch": epoch, "fold": args.fold, "split": data.eval_split,
        "accuracy": accuracy,
        **{what: {"before": r[f"{what}_before"], "after": r[f"{what}_after"]}
           for what in ("channels", "params", "flops")},
        "max_logit_deviation": r["max_logit_deviation"], "carrier_channels": r["fold"]["carrier_channels"],
    }
    (out / "prune.json").write_text(json.dumps(summary, indent=1) + "\n")
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items() if v is not None)
    print(f"{data.eval_split} accuracy: {shown}; channels {r['channels_before']} -> {r['channels_after']} "
          f"({r['fold']['carrier_channels']} carriers), params {r['params_before']} -> {r['params_after']}, "
          f"max logit deviation {r['max_logit_deviation']:.3g}")
    print(f"pruned: {out}")
    return 0


def cmd_export(args) -> int:
    from palm_jax.deploy import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, force=args.force, which=args.which)
    print(f"exported: {out} (serve it with palm_jax.load_exported)")
    return 0


def user_errors() -> tuple:
    from palm_jax.data import DataNotFoundError
    from palm_jax.pruning import PrunedCheckpointError
    from palm_jax.train import CheckpointError, ConfigError

    return (
        UsageError,
        ConfigError,
        DataNotFoundError,
        CheckpointError,
        PrunedCheckpointError,
        ValueError,
        OSError,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("PALM_JAX_DEBUG", "") not in ("", "0")
    started = time.perf_counter()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            f"palm_jax {args.command}: interrupted after {time.perf_counter() - started:.0f} s; "
            "continue with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        from palm_jax.train import TrainingDiverged

        if debug or not isinstance(err, (*user_errors(), TrainingDiverged)):
            raise
        print(f"palm_jax {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USAGE


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
