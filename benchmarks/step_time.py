"""Training-step time of VGG on CIFAR shapes: palm_jax with and without palm_prox, and eager PyTorch NS.

    python benchmarks/step_time.py                       # VGG-19, batch 64 and 256, float32 and bfloat16
    python benchmarks/step_time.py --batch-sizes 8 --dtypes float32 --steps 2 --repeats 2 \\
        --model-depth 11 --width-scale 0.0625 --num-images 64 --out /tmp/step.json      # CPU smoke run

Rows (ms/step and images/s, on whatever device JAX finds):
  prox   palm_jax.train.step.train_chunk with the project's optimiser (decay -> SGD momentum -> palm_prox)
  plain  the same step and chain without palm_prox (method "baseline")
  torch  an eager PyTorch re-implementation of the reference NS step (VGG NS cfg, cross-entropy, backward,
         grad += l1 * sign(bn.weight) as NS's updateBN, SGD momentum 0.9, weight decay 1e-4), when torch
         is importable; on CUDA if torch sees a GPU.

Method. palm_jax: synthetic uint8 images on the device, random batch indices [K, B] (K = --steps); one
dispatch runs K steps (gather, crop/flip, normalise, forward, backward, update); the first two dispatches
(compile, warm-up) are excluded; each repeat times one dispatch to `block_until_ready`; ms/step = median / K.
prox and plain alternate repeat by repeat, so clock drift hits both alike. torch: pre-made normalised float
batches on the device (no augmentation: the reference does that on the CPU), metrics accumulated on the
device (no per-step host sync), --torch-warmup steps excluded, then repeats of K steps each closed by
torch.cuda.synchronize(); cudnn.benchmark on; bfloat16 via torch.autocast.
With torch requested, JAX is limited to half the accelerator memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
unless set) so that both fit. Rows run one (batch, dtype) group at a time, in the order given, and the JSON
(--out) is rewritten after each group, so a run stopped at a time limit keeps what it measured. Prints the
table last.
"""

import argparse
import os
import sys

import common

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
IMPLS = ("prox", "plain", "torch")
DTYPES = ("float32", "bfloat16")
LABELS = {"prox": "palm_jax step + palm_prox", "plain": "palm_jax step, no prox",
          "torch": "PyTorch eager NS step"}
L1, LR = 1e-4, 0.1  # NS's sparsity weight for VGG (-s 0.0001) and initial learning rate


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed dispatch (K)")
    parser.add_argument("--repeats", type=int, default=5, help="timed dispatches; the median is reported")
    parser.add_argument("--num-images", type=int, default=50_000, help="synthetic uint8 images on the device")
    parser.add_argument("--torch-warmup", type=int, default=20, help="untimed torch steps first")
    parser.add_argument("--torch-channels-last", action="store_true", help="torch model and input NHWC")
    common.add_model_args(parser)
    return parser.parse_args(argv)


class JaxBench:
    """The palm_jax rows: synthetic uint8 data on the device, one train state per row."""

    def __init__(self, args):
        import jax
        import numpy as np

        from palm_jax.train.step import DeviceData

        self.args, self.rng = args, np.random.default_rng(0)
        images = self.rng.integers(0, 256, (args.num_images, *IMAGE_SHAPE), dtype=np.uint8)
        labels = self.rng.integers(0, NUM_CLASSES, args.num_images).astype(np.int32)
        self.data = DeviceData(jax.device_put(images), jax.device_put(labels))

    def rows(self, batch: int, dtype: str) -> list[dict]:
        """prox and plain at (batch, dtype), their timed repeats interleaved."""
        import jax
        import numpy as np

        from palm_jax.train.config import TrainConfig
        from palm_jax.train.state import build_model, create_train_state, init_variables, make_optimizer
        from palm_jax.train.step import train_chunk

        args = self.args
        idx = jax.device_put(self.rng.integers(0, args.num_images, (args.steps, batch)).astype(np.int32))
        widths = common.vgg_widths(args.model_depth, args.width_scale)
        runs = {}
        for impl in (i for i in ("prox", "plain") if i in args.impls):
            cfg = TrainConfig(model="vgg", depth=args.model_depth, widths=widths, batch_size=batch,
                              dtype=dtype, method="prox" if impl == "prox" else "baseline", lr=LR)
            model = build_model(cfg, NUM_CLASSES)
            tx = make_optimizer(cfg.replace(lr_drops=()), steps_per_epoch=1)  # the initial lr throughout
            state = create_train_state(model, tx, init_variables(model, 0, IMAGE_SHAPE), seed=0)
            runs[impl] = {"state": state, "dtype": cfg.compute_dtype, "times": []}

        def dispatch(run):
            run["state"], run["out"] = train_chunk(run["state"], self.data, idx, np.int32(args.steps),
                                                   dtype=run["dtype"])
            jax.block_until_ready((run["state"], run["out"]))

        for run in runs.values():
            run["first_call_s"] = common.timed(lambda run=run: dispatch(run))  # compiles
            dispatch(run)
        for _ in range(args.repeats):
            for run in runs.values():
                run["times"].append(common.timed(lambda run=run: dispatch(run)))
        kind = jax.devices()[0].device_kind
        return [_row(impl, batch, dtype, run["times"], args.steps, kind, first_call_s=run["first_call_s"],
                     final_loss=float(run["out"]["loss"][args.steps - 1])) for impl, run in runs.items()]


def torch_module():
    """torch, or None and why not."""
    try:
        import torch
    except ImportError as err:
        return None, f"torch not importable ({err}); install the bench extra: pip install -e .[bench]"
    torch.backends.cudnn.benchmark = True
    return torch, None


def torch_row(torch, args, batch: int, dtype: str) -> dict:
    """The NS reference step in eager PyTorch at (batch, dtype)."""
    import time

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    fmt = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    model = ns_vgg(torch, args.model_depth, common.vgg_widths(args.model_depth, args.width_scale))
    model = model.to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    pool = 8  # distinct batches, cycled
    images = [torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(pool)]
    labels = torch.randint(0, NUM_CLASSES, (pool, batch), device=device)
    totals = {"loss": torch.zeros((), device=device),
              "correct": torch.zeros((), dtype=torch.long, device=device)}

    def step(i):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            output = model(images[i % pool])
            loss = torch.nn.functional.cross_entropy(output, labels[i % pool])
        totals["loss"] += loss.detach().float()  # NS reads loss.item() here: a per-step sync left out
        totals["correct"] += (output.argmax(1) == labels[i % pool]).sum()
        loss.backward()
        with torch.no_grad():  # NS's updateBN: the L1 subgradient on every BN weight
            for bn in bns:
                bn.weight.grad.add_(L1 * torch.sign(bn.weight))
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(args.torch_warmup):
        step(i)
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        sync()
        times.append(time.perf_counter() - start)
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    mean_loss = totals["loss"].item() / (args.torch_warmup + args.repeats * args.steps)
    return _row("torch", batch, dtype, times, args.steps, kind, mean_loss=mean_loss, torch_device=device,
                channels_last=args.torch_channels_last, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def ns_vgg(torch, depth: int, widths):
    """The NS reference VGG (models/vgg.py): conv3x3 (no bias) -> BN -> ReLU, max pools, avg pool 2, Linear;
    NS's initialisation (conv N(0, 2 / (9 * out)), BN weight 0.5, Linear N(0, 0.01))."""
    from palm_jax.models.vgg import VGG_CFG

    nn = torch.nn
    layers, channels, i = [], 3, 0
    for c in VGG_CFG[depth]:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        width = c if widths is None else widths[i]
        conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, (2.0 / (9 * width)) ** 0.5)
        bn = nn.BatchNorm2d(width)
        nn.init.constant_(bn.weight, 0.5)
        nn.init.zeros_(bn.bias)
        layers += [conv, bn, nn.ReLU(inplace=True)]
        channels, i = width, i + 1
    fc = nn.Linear(channels, NUM_CLASSES)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), fc)


def _row(impl, batch, dtype, times, steps, device_kind, **extra) -> dict:
    import statistics

    ms = 1000 * statistics.median(times) / steps
    return {"impl": impl, "label": LABELS[impl], "batch": batch, "dtype": dtype, "ms_per_step": ms,
            "images_per_s": batch * 1000 / ms, "steps_per_repeat": steps, "repeats": len(times),
            "repeat_ms": [1000 * t for t in times], "device_kind": device_kind, **extra}


def derived(rows: list[dict]) -> list[dict]:
    """Per (batch, dtype): palm_prox overhead over the plain step, and the speed-up over the torch step."""
    ms = {(r["impl"], r["batch"], r["dtype"]): r["ms_per_step"] for r in rows}
    out = []
    for batch, dtype in sorted({(r["batch"], r["dtype"]) for r in rows}):
        prox, plain, torch = (ms.get((i, batch, dtype)) for i in IMPLS)
        out.append({"batch": batch, "dtype": dtype,
                    "prox_overhead_pct": None if None in (prox, plain) else 100 * (prox - plain) / plain,
                    "speedup_vs_torch": None if None in (prox, torch) else torch / prox})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if "torch" in args.impls:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    env = common.environment()
    jax_bench = JaxBench(args) if {"prox", "plain"} & set(args.impls) else None
    torch, torch_skipped = torch_module() if "torch" in args.impls else (None, None)
    if torch_skipped:
        print(f"torch rows skipped: {torch_skipped}")
    result = {"benchmark": "step_time", "environment": env, "model": f"vgg{args.model_depth}",
              "width_scale": args.width_scale, "num_images": args.num_images, "rows": [], "derived": [],
              "torch_skipped": torch_skipped}
    for batch in args.batch_sizes:  # one (batch, dtype) group at a time, the JSON rewritten after each
        for dtype in args.dtypes:
            if jax_bench is not None:
                result["rows"] += jax_bench.rows(batch, dtype)
            if torch is not None:
                result["rows"].append(torch_row(torch, args, batch, dtype))
            result["derived"] = derived(result["rows"])
            path = common.write_json(result, args.out, "step_time", env)
            print(f"batch {batch} {dtype} done; wrote {path}", flush=True)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    common.print_table(
        ["impl", "batch", "dtype", "ms/step", "images/s"],
        [[r["label"], r["batch"], r["dtype"], fmt(r["ms_per_step"], ".3f"), fmt(r["images_per_s"], ".0f")]
         for r in result["rows"]],
        f"step time, vgg{args.model_depth} x{args.width_scale}, {env['device_kind']} ({env['date']})")
    common.print_table(
        ["batch", "dtype", "palm_prox overhead %", "palm_jax+prox vs torch (x)"],
        [[d["batch"], d["dtype"], fmt(d["prox_overhead_pct"], "+.1f"), fmt(d["speedup_vs_torch"], ".2f")]
         for d in result["derived"]], "derived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
