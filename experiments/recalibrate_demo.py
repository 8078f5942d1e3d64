r"""Pruned against BN-recalibrated accuracy of trained runs: what `palm_jax.recalibrate_bn` gives back.

For each run directory (written by `python -m palm_jax.cli train`), its latest checkpoint is pruned again as
the pipeline prunes it (sparse scales: xi for prox, the recipe's percentile for NS; exact fold), then the
pruned model's BatchNorm statistics are re-estimated from the first --images training images (never the
evaluation split) in batches of the run's batch size, and both are scored on the run's evaluation split. The
trained model, recalibrated the same way, is shown too. Prints one markdown table.

    PYTHONPATH=$PWD python experiments/recalibrate_demo.py /tmp/recal-prox /tmp/recal-ns [--images 3000]

The runs measured for issue 16 (`make demo` on the offline CIFAR-10 data, val split), for METHOD prox and ns:
    python -m palm_jax.cli train --recipe demo --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg \
        --method METHOD --out /tmp/recal-METHOD
"""

import argparse
import time
from pathlib import Path

from palm_jax import recalibrate_bn
from palm_jax.data import normalize
from palm_jax.train.experiment import accuracy_of, load_data, load_trained, prune_trained
from palm_jax.train.step import to_eval_batches


def measure(run_dir: Path, num_images: int) -> dict:
    """Accuracies (trained, pruned, each also recalibrated), channels and recalibration seconds of one run."""
    cfg, state, epoch = load_trained(run_dir)
    data = load_data(cfg.replace(train_images=num_images))  # the first num_images of the training split
    score = lambda model, variables: accuracy_of(
        model, variables, data.eval_images, data.eval_labels, cfg.eval_batch_size
    )
    eval_data = to_eval_batches(data.eval_images, data.eval_labels, cfg.eval_batch_size)
    result, scores = prune_trained(cfg, state, data.eval_images, eval_data)
    recalibrate = lambda model, variables: recalibrate_bn(
        model, variables, data.train_images, batch_size=cfg.batch_size, preprocess=normalize
    )
    trained = state.apply_fn.model, state.variables()
    started = time.perf_counter()
    recalibrated = recalibrate(result.model, result.variables)
    seconds = time.perf_counter() - started
    report = result.report
    return {
        "run": f"{run_dir} ({cfg.method}, epoch {epoch})",
        "split": data.eval_split,
        "trained": score(*trained),
        "trained, recalibrated": score(trained[0], recalibrate(*trained)),
        "pruned": scores["pruned"],
        "pruned, recalibrated": score(result.model, recalibrated),
        "channels": f"{report['channels_before']} -> {report['channels_after']}",
        "images": len(data.train_images) // cfg.batch_size * cfg.batch_size,
        "seconds": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of `palm_jax.cli train`")
    parser.add_argument("--images", type=int, default=3000, help="training images to recalibrate on")
    args = parser.parse_args(argv)
    rows = [measure(run, args.images) for run in args.runs]
    columns = ["trained", "trained, recalibrated", "pruned", "pruned, recalibrated"]
    print(f"| run | {' | '.join(columns)} | channels | images used | recalibration (s) |")
    print("| --- " * (len(columns) + 4) + "|")
    for row in rows:
        accuracies = " | ".join(f"{100 * row[c]:.2f}" for c in columns)
        print(f"| {row['run']} | {accuracies} | {row['channels']} | {row['images']} | {row['seconds']:.1f} |")
    print(f"top-1 accuracy (%) on the {rows[0]['split']} split; recalibrated on training images only")


if __name__ == "__main__":
    main()
