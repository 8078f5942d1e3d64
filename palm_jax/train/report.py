"""The run's report: `report.json` (machine-readable) and `report.md` (a table like Network Slimming's).

report.json keys: method, model, dataset, split ("test" or "val"), epochs, finetune_epochs, accuracy {trained,
sparse, pruned, recalibrated, finetuned} (fractions; sparse is null except for prox, recalibrated null with
--recalibrate-images 0, finetuned null without fine-tuning), saved_model (which of those run_dir/pruned holds:
"finetuned", "recalibrated" or "pruned"), recalibration {images, batch_size, seconds, which} (the pruned
model's BatchNorm statistics re-estimated on training images, `palm_jax.recalibrate_bn`; null when off),
headline ("last epoch": what `accuracy` holds), best_epoch {trained, finetuned} ({epoch, accuracy} of the
epoch with the highest eval accuracy, null without that phase), channels / params / flops / flops_ns
{before, after} (flops: XLA's count, flops_ns: the papers'; flops_conventions says which is which),
latency {device, platform, dtype, batches {n: {before_ms, after_ms, speedup, repeats}}} (the unpruned and the
pruned model's jitted eval forward pass, `palm_jax.deploy.measure_latency`), channels_per_layer [{layer,
before, after, carriers}], prune {percent, threshold, max_logit_deviation, carrier_channels}, seconds {train,
total}, train_images, train_splits, eval_images, preprocess {mean, std, crop_flip}, config.

The headline accuracies are the last epoch's. The originals keep the epoch with the best test accuracy
(`model_best`: proximal-ns main.py:247-254, network-slimming main.py:181-188) and prune and report that one;
choosing an epoch on the split that is then reported is optimistic, so here it is recorded beside the
headline, not instead of it.
"""

import json
from pathlib import Path

from palm_jax.deploy.latency import latency_table
from palm_jax.utils import atomic_write

HEADLINE = "last epoch"
ACCURACY_KEYS = ("trained", "sparse", "pruned", "recalibrated", "finetuned")

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def layer_channels(prune_report: dict) -> list[dict]:
    """[{layer, before, after, carriers}] per prunable layer, from `palm_jax.prune`'s report."""
    return [
        {"layer": str(r["layer"]), **{key: int(r[key]) for key in ("before", "after", "carriers")}}
        for r in prune_report["layers"]
    ]


def best_epoch(records: list[dict], phase: str) -> dict | None:
    """{epoch, accuracy} of the phase's epoch with the highest eval accuracy (the earliest among equals, as
    the originals' `prec1 > best_prec1`), or None when the phase has no record."""
    rs = [r for r in records if r["phase"] == phase]
    if not rs:
        return None
    best = max(rs, key=lambda r: r["eval_accuracy"])  # max keeps the first of equal values
    return {"epoch": best["epoch"], "accuracy": best["eval_accuracy"]}


def build(cfg, dataset, accuracy: dict, prune_report: dict, records: list[dict], seconds: dict) -> dict:
    layers = layer_channels(prune_report)
    accuracy = {key: accuracy.get(key) for key in ACCURACY_KEYS}
    sizes = lambda what: {key: int(prune_report[f"{what}_{key}"]) for key in ("before", "after")}
    return {
        "method": cfg.method,
        "model": f"{cfg.model}{cfg.depth}",
        "dataset": dataset.name,
        "split": dataset.eval_split,
        "epochs": cfg.epochs,
        "finetune_epochs": cfg.finetune_epochs,
        "accuracy": accuracy,
        "saved_model": next(k for k in ("finetuned", "recalibrated", "pruned") if accuracy[k] is not None),
        "recalibration": prune_report.get("recalibration"),
        "headline": HEADLINE,
        "best_epoch": {"trained": best_epoch(records, "train"), "finetuned": best_epoch(records, "finetune")},
        **{what: sizes(what) for what in ("channels", "params", "flops", "flops_ns")},
        "flops_conventions": prune_report["flops_conventions"],
        "latency": prune_report.get("latency"),
        "channels_per_layer": layers,
        "prune": {
            "percent": cfg.prune_percent,
            "threshold": float(prune_report["threshold"]),
            "max_logit_deviation": float(prune_report["max_logit_deviation"]),
            "carrier_channels": int(prune_report["fold"]["carrier_channels"]),
        },
        "seconds": {key: round(float(value), 2) for key, value in seconds.items()},
        "train_images": len(dataset.train_labels),
        "train_splits": list(dataset.train_splits),
        "eval_images": len(dataset.eval_labels),
        "preprocess": dataset.preprocess._asdict(),
        "config": cfg.to_dict(),
    }


def write(run_dir: Path, report: dict) -> Path:
    """Write report.json and report.md into `run_dir` (each atomically); returns the report.json path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_JSON
    atomic_write(path, json.dumps(report, indent=1) + "\n")
    atomic_write(run_dir / REPORT_MD, markdown(report))
    return path


def markdown(report: dict) -> str:
    acc, split = report["accuracy"], report["split"]
    pruned_what = (
        f"Pruned ({report['prune']['percent']:g}%)"
        if report["prune"]["percent"] is not None
        else "Pruned (zeros)"
    )
    columns = ["Trained", "Sparse (xi)", pruned_what, "Recalibrated (BN statistics)",
               f"Fine-tuned ({report['finetune_epochs']} ep.)"]
    shown = [i for i, k in enumerate(ACCURACY_KEYS) if acc[k] is not None]
    size = lambda what, i: report[what]["before" if ACCURACY_KEYS[i] in ("trained", "sparse") else "after"]
    rows = [
        [f"Top-1 accuracy (%, {split})"] + [f"{100 * acc[ACCURACY_KEYS[i]]:.2f}" for i in shown],
        ["Parameters"] + [_human(size("params", i)) for i in shown],
        ["FLOPs, XLA (`flops`)"] + [_human(size("flops", i)) for i in shown],
        ["FLOPs, papers (`flops_ns`)"] + [_human(size("flops_ns", i)) for i in shown],
        ["Channels (BN)"] + [str(size("channels", i)) for i in shown],
    ]
    head = f"{report['dataset']} {report['model']} ({report['method']}, {report['epochs']} epochs)"
    lines = [
        f"# Report: {head}",
        "",
        "| " + " | ".join([head] + [columns[i] for i in shown]) + " |",
        "| " + " | ".join(["---"] * (len(shown) + 1)) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        f"Evaluated on the {split} split ({report['eval_images']} images); trained on "
        f"{report['train_images']} images. Training took {report['seconds']['train']:.1f} s, the whole run "
        f"{report['seconds']['total']:.1f} s.",
        "",
        best_epoch_line(report),
        "",
        recalibration_line(report),
        "",
        "FLOPs of one eval forward pass on one image: "
        + "; ".join(f"`{key}` is {text}" for key, text in report["flops_conventions"].items()) + ".",
    ]
    if report.get("latency"):
        lines += ["", latency_table(report["latency"])]
    lines += [
        "",
        "| layer | channels before | kept | of which carriers (scale 0) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['layer']} | {r['before']} | {r['after']} | {r['carriers']} |"
        for r in report["channels_per_layer"]
    ]
    return "\n".join(lines) + "\n"


def recalibration_line(report: dict) -> str:
    """What "Recalibrated" is, and which model run_dir/pruned holds."""
    done = report["recalibration"]
    what = ("BatchNorm statistics not recalibrated (--recalibrate-images 0)." if done is None else
            f"Recalibrated: the pruned model with every BatchNorm's running mean and variance re-estimated "
            f"in {done['seconds']:.1f} s (palm_jax.recalibrate_bn; no parameter changes, no gradient step) "
            f"on {done['which']}; never on the {report['split']} split.")
    saved = report["saved_model"]
    if saved == "finetuned":
        start = "pruned" if done is None else "recalibrated"
        saved = f"fine-tuned model (fine-tuning started from the {start} one)"
    else:
        saved += " model"
    return f"{what} The saved model (pruned/) is the {saved}."


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def best_epoch_line(report: dict) -> str:
    """The sentence saying which accuracy is the headline and what the best epoch reached."""
    split, parts = report["split"], []
    for key, what in (("trained", "training"), ("finetuned", "fine-tuning")):
        best = report["best_epoch"][key]
        if best is not None:
            parts.append(f"{what}: epoch {best['epoch']}, {100 * best['accuracy']:.2f}%")
    return (f"Accuracies are the {report['headline']}'s. Best epoch by {split} accuracy "
            f"({'; '.join(parts)}): the originals report that one, chosen on the same split (optimistic).")
