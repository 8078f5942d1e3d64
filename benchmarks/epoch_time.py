"""Whole training epochs through the real input pipeline, and the input pipeline's share of an epoch.

    python benchmarks/epoch_time.py --data-dir .data/cifar10-jpeg    # CIFAR-10 npz folder, VGG-19, 3 epochs
    python benchmarks/epoch_time.py                                  # 50,000 generated images instead
    python benchmarks/epoch_time.py --num-images 256 --batch-size 32 --epochs 2 --eval-images 64 \\
        --model-depth 11 --width-scale 0.0625 --out /tmp/epoch.json    # CPU smoke run

End to end: `palm_jax.train.experiment.train_phase`, the code `palm-jax train` runs: the dataset on the device
as uint8, per epoch the data order drawn on the device (`epoch_batches`), chunks of steps per dispatch
(`train_chunk`: gather, crop/flip, normalise, step), metrics read back one chunk late, eval, zero fraction,
an Orbax checkpoint and a metrics record. Reported: the wall time of all N epochs (compilation included) and
each epoch's own "seconds" from metrics.jsonl; the steady epoch is the median of epochs 2..N.

Decomposition, each part timed on its own afterwards (compiled, blocked until done, median of --repeats):
  compute    one epoch of `train_chunk` dispatches back to back on a precomputed order, one sync at the end
  eval       `evaluate` over the eval split
  index      the epoch's data order (`epoch_batches`: permutation + padding)
  augment    the on-device input work of one epoch alone: gather `images[order]`, random crop/flip, normalise
             (a compiled loop over the epoch's batches, reduced to a scalar so that nothing is skipped)
  host       steady epoch - compute - eval: what the loop adds outside the compiled programs (dispatch,
             metric read-back, zero fraction, checkpoint, metrics file, progress bar)
input pipeline share = (index + augment) / steady epoch: the time the data spend being shuffled, gathered and
augmented (the augment part also runs inside `compute`). host share = host / steady epoch.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="npz folder of CIFAR-10 (train.npz [test.npz])")
    parser.add_argument("--num-images", type=int, default=50_000, help="generated images (no --data-dir)")
    parser.add_argument("--eval-images", type=int, default=10_000, help="generated eval set (no --data-dir)")
    parser.add_argument("--train-images", type=int, default=None, help="the first K of --data-dir's images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--method", default="prox", choices=["prox", "ns", "ista", "baseline"])
    parser.add_argument("--steps-per-dispatch", type=int, default=None, help="default: the loop's own choice")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each part; the median is reported")
    common.add_model_args(parser)
    return parser.parse_args(argv)


def load(args):
    from palm_jax.data import load_dataset, synthetic_dataset

    if args.data_dir is None:
        return synthetic_dataset(num_train=args.num_images, num_eval=args.eval_images)
    return load_dataset("cifar10", args.data_dir, train_images=args.train_images)


def run(args) -> dict:
    import jax

    from palm_jax.train.config import TrainConfig
    from palm_jax.train.experiment import train_phase
    from palm_jax.train.loop import Inputs, chunk_layout, default_steps_per_dispatch, epoch_batches
    from palm_jax.train.metrics import read_metrics
    from palm_jax.train.state import build_model, init_variables
    from palm_jax.train.step import evaluate, to_device, to_eval_batches, train_chunk

    start = time.perf_counter()
    dataset = load(args)
    load_s = time.perf_counter() - start
    widths = common.vgg_widths(args.model_depth, args.width_scale)
    cfg = TrainConfig(model="vgg", depth=args.model_depth, widths=widths, batch_size=args.batch_size,
                      dtype=args.dtype, method=args.method, epochs=args.epochs,
                      steps_per_dispatch=args.steps_per_dispatch, eval_batch_size=args.eval_batch_size)
    start = time.perf_counter()
    data = jax.block_until_ready(to_device(dataset.train_images, dataset.train_labels))
    eval_data = jax.block_until_ready(to_eval_batches(dataset.eval_images, dataset.eval_labels,
                                                      cfg.eval_batch_size))
    to_device_s = time.perf_counter() - start
    model = build_model(cfg, dataset.num_classes)
    variables = init_variables(model, cfg.seed, data.images.shape[1:])

    with tempfile.TemporaryDirectory(prefix="palm_jax_epoch_time_") as run_dir:
        start = time.perf_counter()
        inputs = Inputs(data, eval_data, dataset.preprocess)
        state = train_phase(cfg, "train", model, variables, inputs, Path(run_dir))
        end_to_end_s = time.perf_counter() - start
        epoch_s = [r["seconds"] for r in read_metrics(Path(run_dir), "train")]
    steady_s = statistics.median(epoch_s[1:] or epoch_s)

    n, b = len(dataset.train_labels), cfg.batch_size
    steps = n // b  # the full batches (the loop runs a last partial one besides)
    num_chunks, chunk = chunk_layout(steps, cfg.steps_per_dispatch or default_steps_per_dispatch(steps))
    order_of = lambda epoch: epoch_batches(state.rng, epoch, n, b, num_chunks * chunk)[0]
    order = jax.block_until_ready(order_of(1))

    def one_epoch():
        nonlocal state
        for c in range(num_chunks):
            state, out = train_chunk(state, data, order[c * chunk:(c + 1) * chunk],
                                     jax.numpy.int32(min(chunk, steps - c * chunk)), dtype=cfg.compute_dtype,
                                     preprocess=dataset.preprocess)
        jax.block_until_ready((state, out))

    augment_epoch = jax.jit(lambda key, idx: augment_only(data, key, idx, steps, cfg.compute_dtype))
    parts = {
        "compute": one_epoch,
        "eval": lambda: evaluate(state.apply_fn, state.variables(), eval_data, dataset.preprocess),
        "index": lambda: jax.block_until_ready(order_of(2)),
        "augment": lambda: jax.block_until_ready(augment_epoch(state.rng, order)),
    }
    parts["augment"]()  # compile
    seconds = {name: statistics.median([common.timed(fn) for _ in range(args.repeats)])
               for name, fn in parts.items()}
    host_s = max(0.0, steady_s - seconds["compute"] - seconds["eval"])
    return {
        "data": dataset.name if args.data_dir is None else f"cifar10 npz ({args.data_dir})",
        "train_images": n, "eval_images": int(eval_data.size), "batch_size": b, "dtype": cfg.dtype,
        "method": cfg.method, "steps_per_epoch": steps, "steps_per_dispatch": chunk, "epochs": cfg.epochs,
        "data_load_s": load_s, "to_device_s": to_device_s, "end_to_end_s": end_to_end_s, "epoch_s": epoch_s,
        "steady_epoch_s": steady_s, **{f"{name}_s": s for name, s in seconds.items()}, "host_s": host_s,
        "train_images_per_s": steps * b / seconds["compute"],
        "input_share_pct": 100 * (seconds["index"] + seconds["augment"]) / steady_s,
        "host_share_pct": 100 * host_s / steady_s,
    }


def augment_only(data, key, order, steps, dtype):
    """The input work of `steps` batches of `order`, as in `train_step`, summed to one number."""
    import jax
    import jax.numpy as jnp

    from palm_jax.data import augment

    def body(i, total):
        images = augment.random_crop_flip(jax.random.fold_in(key, i), data.images[order[i]])
        return total + jnp.sum(augment.normalize(images, dtype=dtype), dtype=jnp.float32)

    return jax.lax.fori_loop(0, steps, body, jnp.zeros([], jnp.float32))


def main(argv=None) -> int:
    args = parse_args(argv)
    env = common.environment()
    result = {"benchmark": "epoch_time", "environment": env, "model": f"vgg{args.model_depth}",
              "width_scale": args.width_scale, **run(args)}
    path = common.write_json(result, args.out, "epoch_time", env)
    print(f"wrote {path}")
    r = result
    rows = [
        ["data load (host decode/generate, once)", f"{r['data_load_s']:.2f} s"],
        ["to device (once)", f"{r['to_device_s']:.2f} s"],
        [f"end to end, {r['epochs']} epochs (compile included)", f"{r['end_to_end_s']:.2f} s"],
        ["epoch seconds (metrics.jsonl)", ", ".join(f"{s:.2f}" for s in r["epoch_s"])],
        ["steady epoch", f"{r['steady_epoch_s']:.3f} s"],
        ["compute (train_chunk only)", f"{r['compute_s']:.3f} s ({r['train_images_per_s']:.0f} images/s)"],
        ["eval", f"{r['eval_s']:.3f} s"],
        ["index generation", f"{r['index_s'] * 1000:.2f} ms"],
        ["augmentation on device (gather, crop/flip, normalise)", f"{r['augment_s'] * 1000:.2f} ms"],
        ["host/other (steady - compute - eval)", f"{r['host_s']:.3f} s"],
        ["input pipeline share", f"{r['input_share_pct']:.2f} %"],
        ["host share", f"{r['host_share_pct']:.2f} %"],
    ]
    common.print_table(["figure", "value"], rows,
                       f"epoch time, vgg{args.model_depth} x{args.width_scale}, {r['train_images']} images, "
                       f"batch "
                       f"{r['batch_size']} {r['dtype']}, {r['steps_per_dispatch']} steps/dispatch, "
                       f"{env['device_kind']} ({env['date']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
