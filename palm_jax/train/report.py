"""The run's report: `report.json` (machine-readable) and `report.md` (a table like Network Slimming's).

report.json keys: method, model, dataset, split ("test" or "val"), epochs, finetune_epochs, accuracy {trained,
sparse, pruned, finetuned} (fractions; sparse is null except for prox, finetuned null without fine-tuning),
channels / params / flops {before, after}, channels_per_layer [{layer, before, after, carriers}], prune
{percent, threshold, max_logit_deviation, carrier_channels}, seconds {train, total}, train_images,
eval_images, config.
"""

import json
from pathlib import Path

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def layer_channels(prune_report: dict) -> list[dict]:
    """[{layer, before, after, carriers}] per prunable layer, from `palm_jax.prune`'s report."""
    return [
        {"layer": str(r["layer"]), **{key: int(r[key]) for key in ("before", "after", "carriers")}}
        for r in prune_report["layers"]
    ]


def build(cfg, dataset, accuracy: dict, prune_report: dict, percent: float | None, seconds: dict) -> dict:
    layers = layer_channels(prune_report)
    return {
        "method": cfg.method,
        "model": f"{cfg.model}{cfg.depth}",
        "dataset": dataset.name,
        "split": dataset.eval_split,
        "epochs": cfg.epochs,
        "finetune_epochs": cfg.finetune_epochs,
        "accuracy": {key: accuracy.get(key) for key in ("trained", "sparse", "pruned", "finetuned")},
        "channels": {
            "before": int(prune_report["channels_before"]),
            "after": int(prune_report["channels_after"]),
        },
        "params": {"before": int(prune_report["params_before"]), "after": int(prune_report["params_after"])},
        "flops": {"before": int(prune_report["flops_before"]), "after": int(prune_report["flops_after"])},
        "channels_per_layer": layers,
        "prune": {
            "percent": percent,
            "threshold": float(prune_report["threshold"]),
            "max_logit_deviation": float(prune_report["max_logit_deviation"]),
            "carrier_channels": int(prune_report["fold"]["carrier_channels"]),
        },
        "seconds": {key: round(float(value), 2) for key, value in seconds.items()},
        "train_images": len(dataset.train_labels),
        "eval_images": len(dataset.eval_labels),
        "config": cfg.to_dict(),
    }


def write(run_dir: Path, report: dict) -> Path:
    """Write report.json and report.md into `run_dir` (each atomically); returns the report.json path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_JSON
    _atomic_write(path, json.dumps(report, indent=1) + "\n")
    _atomic_write(run_dir / REPORT_MD, markdown(report))
    return path


def markdown(report: dict) -> str:
    acc, split = report["accuracy"], report["split"]
    pruned_what = (
        f"Pruned ({report['prune']['percent']:g}%)"
        if report["prune"]["percent"] is not None
        else "Pruned (zeros)"
    )
    columns = ["Trained", "Sparse (xi)", pruned_what, f"Fine-tuned ({report['finetune_epochs']} ep.)"]
    keys = ["trained", "sparse", "pruned", "finetuned"]
    shown = [i for i, k in enumerate(keys) if acc[k] is not None]
    size = lambda what, i: (
        report[what]["before"] if keys[i] in ("trained", "sparse") else report[what]["after"]
    )
    rows = [
        [f"Top-1 accuracy (%, {split})"] + [f"{100 * acc[keys[i]]:.2f}" for i in shown],
        ["Parameters"] + [_human(size("params", i)) for i in shown],
        ["FLOPs (forward, per image)"] + [_human(size("flops", i)) for i in shown],
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
        "| layer | channels before | kept | of which carriers (scale 0) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['layer']} | {r['before']} | {r['after']} | {r['carriers']} |"
        for r in report["channels_per_layer"]
    ]
    return "\n".join(lines) + "\n"


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
