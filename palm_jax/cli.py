"""Command line: `palm-jax train|recipes|eval|prune|export ...` (also `python -m palm_jax.cli ...`).

    train    --recipe NAME (palm_jax/recipes.py; default: the paper recipe of --model/--method/--dataset), any
             option overriding it (one per TrainConfig field); writes the run directory (--out, default
             runs/<recipe>[-<data folder>][-e<epochs>][-n<train images>][-b<batch>]) and prints
             `report: <path>` last.
    recipes  lists the recipes; `recipes NAME [options] [--json]` prints the settings a train run would use.
    eval     CHECKPOINT: a run directory, one of its epoch checkpoints, or a pruned model (run/pruned); prints
             the top-1 accuracy on --npz FILE, --data-dir DIR (its test split, else its validation
             hold-out) or the downloaded test split, and writes it as JSON.
    prune    RUN_DIR: prunes the run's checkpoint again (--fold exact|closest|none, --which latest|best) into
             RUN_DIR/pruned-<fold> (or --out: a new or empty folder; --force replaces an earlier pruned model
             there, nothing else) with prune.json: accuracies, channels, params, FLOPs, deviation.
    export   CHECKPOINT --out DIR [--force]: what `eval` evaluates, as a jax.export artifact served by
             `palm_jax.load_exported(DIR)` without the model's code (palm_jax/deploy).

A user error (bad option, missing data, foreign checkpoint) prints one line and exits with status 2; a
diverged run (NaN or infinite loss) prints the step and exits with 3; an interrupted one exits with 130 and
can be continued with --resume. Set PALM_JAX_DEBUG=1 to get tracebacks instead.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from palm_jax import recipes
from palm_jax.utils import abstract_variables, atomic_write, first_line

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class UsageError(Exception):
    """A bad command line or user input: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (`--batch-size` for `batch_size`), typed, with the field's help and
    default; an option not given sets nothing (argparse.SUPPRESS), so that the options given can be told from
    the recipe's values (`given_settings`)."""
    from palm_jax.train.config import option_fields

    group = parser.add_argument_group(
        "settings", "each overrides the recipe's value; the defaults shown are TrainConfig's, i.e. the "
        "cifar10-vgg19 recipe's; a setting that may be unset also takes 'none'")
    for f, kind, optional in option_fields():
        choices = f.metadata.get("choices")
        shown = _show(f.default)
        extra = f"; one of {', '.join(choices)}" if choices else ""
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(),
                           type=_parser_of(kind, optional, choices), default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {shown}{extra})")


def _show(value) -> str:
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parser_of(kind, optional: bool, choices):
    """The argparse `type` of a field: ints, floats, strings, comma-separated tuples; 'none' for None."""
    import typing

    element = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
    what = (f"comma-separated {element.__name__}s" if element else
            "text" if issubclass(kind, str) else f"a number ({kind.__name__})")

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return None
        try:
            value = tuple(element(x) for x in text.split(",")) if element else (
                str(text) if issubclass(kind, str) else kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")
        return value

    return parse


def recipe_list() -> str:
    return "\n".join(f"  {name:24} {recipe.summary}" for name, recipe in recipes.RECIPES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="palm_jax", description="Proximal network slimming: train, prune, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser(
        "train", help="train, prune, (fine-tune) and report one experiment",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="recipes:\n" + recipe_list())
    train.add_argument("--recipe", help="a recipe (listed below; palm-jax recipes NAME shows its settings); "
                       "default: the paper recipe of --model, --method and --dataset")
    add_config_options(train)
    train.add_argument("--out", help="run directory (default: runs/<recipe or dataset-model-method>, tagged "
                       "-<data folder> -e<epochs> -n<train images> -b<batch> when those are given)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    train.set_defaults(func=cmd_train)

    listing = commands.add_parser("recipes", help="list the recipes, or print one's settings")
    listing.add_argument("recipe", nargs="?", help="a recipe name (none: list them all)")
    listing.add_argument("--json", action="store_true", help="print the settings as JSON")
    add_config_options(listing)
    listing.set_defaults(func=cmd_recipes)

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
    evaluate.add_argument("--out", help="JSON file for the result (default: eval.json beside the "
                          "checkpoint); an existing file is replaced only when it is an earlier result")
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
    reprune.add_argument("--out", help="a new or empty folder for the pruned model (default: "
                         "RUN_DIR/pruned-<fold>); never the run directory, a folder holding it or one of its "
                         "own")
    reprune.add_argument("--force", action="store_true", help="replace a previous pruned model in --out (a "
                         "folder holding anything else is never replaced)")
    reprune.add_argument("--recalibrate-images", type=int, metavar="N",
                         help="re-estimate the pruned model's BatchNorm statistics on N training images "
                         "(0: not at all; default: the run's setting)")
    reprune.set_defaults(func=cmd_prune)

    export = commands.add_parser("export", help="write a checkpoint as a jax.export artifact to serve")
    export.add_argument("checkpoint", help="a run directory, its checkpoints/<epoch>, or a pruned model")
    export.add_argument("--out", required=True, help="folder for model.jax, weights.npz, exported.json")
    export.add_argument("--which", choices=("latest", "best"), default="latest", help="which checkpoint")
    export.add_argument("--force", action="store_true", help="replace the export files in a non-empty --out")
    export.set_defaults(func=cmd_export)
    return parser


def given_settings(args) -> dict:
    """The TrainConfig fields set on the command line."""
    from palm_jax.train.config import option_fields

    return {f.name: getattr(args, f.name) for f, _, _ in option_fields() if hasattr(args, f.name)}


def cmd_train(args) -> int:
    from palm_jax.train import run_experiment
    from palm_jax.train.sharding import initialize_distributed

    initialize_distributed()  # multi-host: joins the other processes; one process: no-op

    given = given_settings(args)
    cfg, name = recipes.resolve(args.recipe, given)
    out = Path(args.out) if args.out else recipes.default_run_dir(name, given)
    quick = args.recipe in recipes.RECIPES and recipes.RECIPES[args.recipe].cpu_sized
    on_data = None if quick else (lambda dataset: warn_if_cpu(cfg, dataset))
    report_path = run_experiment(cfg, out, resume=args.resume, on_data=on_data)
    summary = json.loads(report_path.read_text())
    acc = {k: (f"{100 * v:.2f}%" if v is not None else "-") for k, v in summary["accuracy"].items()}
    print(
        f"accuracy ({summary['split']}, {summary['headline']}): trained {acc['trained']}, sparse "
        f"{acc['sparse']}, pruned {acc['pruned']}, recalibrated {acc['recalibrated']}, fine-tuned "
        f"{acc['finetuned']}; "
        f"channels {summary['channels']['after']}/{summary['channels']['before']}"
        f", params {summary['params']['after']}/{summary['params']['before']}"
    )
    print(f"report: {report_path}")
    return 0


def cmd_recipes(args) -> int:
    if args.recipe is None:
        print(recipe_list())
        return 0
    cfg, _ = recipes.resolve(args.recipe, given_settings(args))
    values = cfg.to_dict()
    if args.json:
        print(json.dumps(values, indent=1))
    else:
        print("\n".join(f"{name}: {_show(value)}" for name, value in values.items()))
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
    from palm_jax.pruning.report import forward_flops
    from palm_jax.train.state import build_model

    model = build_model(cfg, num_classes)
    flops = forward_flops(model, abstract_variables(model, image_shape), tuple(image_shape))
    per_epoch = 3 * train_images + eval_images
    total = flops * ((cfg.epochs + cfg.finetune_epoch_count) * per_epoch + 2 * eval_images)
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
    from palm_jax.data import DATASETS, NUM_CLASSES, load_dataset
    from palm_jax.data.sources import read_npz
    from palm_jax.pruning import load_pruned
    from palm_jax.train import TrainConfig
    from palm_jax.train.experiment import CONFIG_FILE, accuracy_of, load_data, load_trained
    from palm_jax.train.outputs import is_eval_result
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
    out = Path(args.out) if args.out else (path if pruned else run_dir) / "eval.json"
    if out.exists() and not is_eval_result(out):
        raise UsageError(f"--out {out} exists and is not a result of `eval`; nothing else is overwritten: "
                         "choose another --out")
    dataset = args.dataset or (cfg.dataset if cfg else None)
    if dataset is None:
        raise UsageError("--dataset is needed: this pruned model has no run config beside it")

    if args.npz:
        if dataset not in NUM_CLASSES:
            raise UsageError(f"--npz needs --dataset among {', '.join(NUM_CLASSES)}; got {dataset!r}")
        images, labels = read_npz(args.npz, NUM_CLASSES[dataset])
        split, source = "npz", args.npz
    else:
        if dataset == "synthetic" and cfg is not None:
            data, source = load_data(cfg), "synthetic"
        else:
            data_dir = args.data_dir or (cfg.data_dir if cfg and cfg.dataset == dataset else None)
            data, source = load_dataset(dataset, data_dir), data_dir or "downloaded"
        images, labels, split = data.eval_images, data.eval_labels, data.eval_split
    preprocess = DATASETS[dataset].preprocess

    result = {"checkpoint": str(path), "data": str(source), "split": split, "images": len(labels)}
    if pruned:
        model, variables, _ = load_pruned(path)
        result["accuracy"] = accuracy_of(model, variables, images, labels, args.batch_size, preprocess)
    else:
        cfg, state, epoch = load_trained(
            run_dir, epoch, best=args.which == "best", image_shape=images.shape[1:]
        )
        result["epoch"] = epoch
        model = state.apply_fn.model
        top1 = lambda variables: accuracy_of(model, variables, images, labels, args.batch_size, preprocess)
        result["accuracy"] = top1(state.variables())
        if cfg.method.keeps_xi:
            result["accuracy_sparse"] = top1(state.variables(sparse_params(state, cfg.method)))
    atomic_write(out, json.dumps(result, indent=1) + "\n")
    print(f"top-1 accuracy: {100 * result['accuracy']:.2f}% on {len(labels)} {split} images of {source}")
    print(f"eval: {out}")
    return 0


def cmd_prune(args) -> int:
    from palm_jax.train.experiment import CONFIG_FILE, load_data, load_trained, prune_trained, save_pruned
    from palm_jax.train.loop import Inputs
    from palm_jax.train.outputs import check_pruned_out
    from palm_jax.train.step import to_eval_batches

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"{run_dir} is not a run directory of `palm_jax train` (no {CONFIG_FILE})")
    out = Path(args.out) if args.out else run_dir / f"pruned-{args.fold}"
    check_pruned_out(out, replace=args.force, run_dir=run_dir)  # before any work
    cfg, state, epoch = load_trained(run_dir, best=args.which == "best")
    if args.recalibrate_images is not None:
        cfg = cfg.replace(recalibrate_images=args.recalibrate_images)
    data = load_data(cfg)
    eval_data = to_eval_batches(data.eval_images, data.eval_labels, cfg.eval_batch_size)
    inputs = Inputs(None, eval_data, data.preprocess)
    result, accuracy = prune_trained(cfg, state, data, inputs, fold=args.fold)
    save_pruned(out, result, replace=args.force)
    r = result.report
    summary = {
        "run": str(run_dir), "epoch": epoch, "fold": args.fold, "split": data.eval_split,
        "accuracy": accuracy,
        **{what: {"before": r[f"{what}_before"], "after": r[f"{what}_after"]}
           for what in ("channels", "params", "flops", "flops_ns")},
        "max_logit_deviation": r["max_logit_deviation"], "carrier_channels": r["fold"]["carrier_channels"],
        "recalibration": r["recalibration"], "latency": r["latency"],
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
        from palm_jax.train import ConfigError, TrainingDiverged

        if debug or not isinstance(err, (*user_errors(), TrainingDiverged)):
            raise
        if isinstance(err, ConfigError) and args.command in ("train", "recipes"):  # settings as made
            err = ConfigError(err.explain(set(given_settings(args))))
        print(f"palm_jax {args.command}: error: {first_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
