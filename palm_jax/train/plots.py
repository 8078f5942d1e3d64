"""PNG plots of a run (matplotlib, Agg backend: no display needed).

scales.png    histogram of |scale| per BatchNorm layer (and of |xi| for prox), exact zeros counted apart
channels.png  channels per layer before and after pruning
curves.png    loss / objective, train and eval accuracy (with the pruned and the BN-recalibrated model's
              eval accuracy after training), fraction of zero scales, per epoch
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from palm_jax.train.report import layer_channels  # noqa: E402
from palm_jax.train.state import scale_leaves  # noqa: E402

MAX_PANELS = 32  # more layers than this (ResNet-164) are drawn as one layer x |scale| heat map


def write_all(
    plot_dir: Path, params, xi_params, prune_report: dict, records: list[dict], split: str,
    accuracy: dict | None = None,
) -> list[Path]:
    """Write the three figures into `plot_dir`; `xi_params` (prox) adds |xi| to the histograms; `accuracy`
    (the report's) adds the pruned and recalibrated accuracies to the curves."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    return [
        scale_histograms(plot_dir / "scales.png", params, xi_params),
        channels_per_layer(plot_dir / "channels.png", prune_report),
        curves(plot_dir / "curves.png", records, split, accuracy),
    ]


def scale_histograms(path: Path, params, xi_params=None) -> Path:
    layers = [(name, np.abs(np.asarray(s, np.float32))) for name, s in scale_leaves(params)]
    xis = (
        [np.abs(np.asarray(s, np.float32)) for _, s in scale_leaves(xi_params)]
        if xi_params is not None
        else None
    )
    top = max(float(max(v.max() for _, v in layers)), 1e-6)
    if xis is not None:
        top = max(top, float(max(v.max() for v in xis)))
    bins = np.linspace(0.0, top, 41)
    if len(layers) > MAX_PANELS:
        return _histogram_heatmap(path, layers, xis, bins)
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for i, (ax, (name, values)) in enumerate(zip(axes.flat, layers, strict=False)):
        ax.stairs(
            np.histogram(values, bins)[0], bins, fill=True, color="tab:blue", alpha=0.6, label="|scale|"
        )
        title = f"{name}: {int((values == 0).sum())}/{values.size} zero"
        if xis is not None:
            ax.stairs(
                np.histogram(xis[i], bins)[0], bins, fill=True, color="tab:red", alpha=0.5, label="|xi|"
            )
            title = f"{name}: xi {int((xis[i] == 0).sum())}/{values.size} zero"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("BatchNorm scale magnitudes per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _histogram_heatmap(path: Path, layers, xis, bins) -> Path:
    panels = [("|scale|", [v for _, v in layers])] + ([("|xi|", xis)] if xis is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.09 * len(layers) + 2), squeeze=False)
    for ax, (label, values) in zip(axes.flat, panels, strict=True):
        counts = np.stack([np.histogram(v, bins=bins)[0] / v.size for v in values])
        ax.imshow(counts, aspect="auto", cmap="viridis", extent=(bins[0], bins[-1], len(values), 0))
        ax.set_xlabel(label)
        ax.set_ylabel("BatchNorm layer (forward order)")
        zeros = sum(int((v == 0).sum()) for v in values)
        ax.set_title(f"{label} per layer: {zeros}/{sum(v.size for v in values)} exactly zero", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def channels_per_layer(path: Path, prune_report: dict) -> Path:
    rows = layer_channels(prune_report)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) + 2), 3.5))
    ax.bar(x, [r["before"] for r in rows], color="lightgray", label="before pruning")
    ax.bar(x, [r["after"] for r in rows], color="tab:blue", label="kept")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=90, fontsize=max(3, 8 - len(rows) // 40))
    ax.set_ylabel("channels")
    kept, total = sum(r["after"] for r in rows), sum(r["before"] for r in rows)
    ax.set_title(f"channels kept per layer: {kept}/{total}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def curves(path: Path, records: list[dict], split: str, accuracy: dict | None = None) -> Path:
    """Per epoch: losses (log scale), accuracies, zero fraction; fine-tuning continues the epoch axis. The
    `accuracy` entries "pruned" and "recalibrated" (when not None) are marked at the last training epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [  # (axis, record key, colour, label)
        (0, "loss", "tab:blue", "train loss"),
        (0, "objective", "tab:orange", "objective"),
        (0, "eval_loss", "tab:green", f"{split} loss"),
        (1, "train_accuracy", "tab:blue", "train"),
        (1, "eval_accuracy", "tab:green", split),
        (2, "zero_fraction", "tab:red", "zero scales"),
    ]
    trained = max((r["epoch"] for r in records if r["phase"] == "train"), default=0)
    for phase, style in (("train", "o-"), ("finetune", "s--")):
        rs = [r for r in records if r["phase"] == phase]
        epochs = [r["epoch"] + (0 if phase == "train" else trained) for r in rs]
        tag = "" if phase == "train" else " (fine-tune)"
        for axis, key, colour, label in panels if rs else []:
            axes[axis].plot(
                epochs, [r[key] for r in rs], style, color=colour, markersize=3, label=label + tag
            )
    for key, marker, colour in (("pruned", "x", "tab:red"), ("recalibrated", "*", "tab:purple")):
        if (accuracy or {}).get(key) is not None:
            axes[1].plot([trained], [accuracy[key]], marker, color=colour, markersize=9,
                         label=f"{key} ({split})")
    titles = (
        "loss (objective = loss + l1 * sum|scale|)",
        f"top-1 accuracy (train, {split})",
        "fraction of BN scales (prox: xi) exactly 0",
    )
    axes[0].set_yscale("log")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
