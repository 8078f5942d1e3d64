"""The experiments' recipes: every setting of the paper runs, read from the originals, in one place.

A recipe is a `TrainConfig`: `RECIPES[name].config(method=None)`; `resolve(name, overrides)` applies the
options a user gave (CLI: `palm-jax train --recipe NAME --epochs 2 ...`, `palm-jax recipes NAME --json`).

Sources, cited by file:line below: the proximal-NS authors' code (Bui et al. 2023,
github.com/kbui1993/Official-Proximal-Network-Slimming: main.py, script.sh, models/) and Network Slimming's
(Liu et al. 2017, github.com/Eric-mingjie/network-slimming: main.py, README.md, *prune.py).

    method    sparsity (l1, beta)                                 pruning                   fine-tune
    prox      VGG-19 (4.5e-3, 100), DenseNet-40 (4e-3, 100),      the zero xi channels      none (optional)
              PreResNet-164 (2e-3, 0.25)
    ista      the same l1, soft-thresholded each step             the zero channels         none (optional)
    ns        l1 1e-4 (VGG), 1e-5 (the others), subgradient       70% (VGG, CIFAR-10), 50%  as many epochs
                                                                  (VGG, CIFAR-100), 40%     as training
    baseline  none                                                nothing is zero           none

The CIFAR-100 recipes reuse the CIFAR-10 (l1, beta): the authors publish values for CIFAR-10 only
(script.sh). Importing this module imports no JAX (the Makefile reads the names with any Python).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from palm_jax.methods import Method

# The training recipe both originals share. proximal-ns main.py:39 (batch 64), :43 (160 epochs), :47 (lr 0.1),
# :49 (momentum 0.9), :51 (weight decay 1e-4), :145 + :238-241 (lr / 10 at int(0.5 * epochs) and
# int(0.75 * epochs)); network-slimming main.py:25, :29, :33, :35, :37, :176 (the same values).
PAPER_SGD = {
    "epochs": 160,
    "batch_size": 64,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_drops": (0.5, 0.75),
}
DEPTH = {
    "vgg": 19,
    "resnet": 164,
    "densenet": 40,
}  # proximal-ns script.sh:1, :5, :9; network-slimming README:33-35
# palm_prox (l1, beta): proximal-ns script.sh:1 (`--s 0.0045 ... --beta 100`), :5 (DenseNet-40), :9
# (ResNet-164).
PROX = {"vgg": (4.5e-3, 100.0), "densenet": (4e-3, 100.0), "resnet": (2e-3, 0.25)}
NS_L1 = {
    "vgg": 1e-4,
    "resnet": 1e-5,
    "densenet": 1e-5,
}  # network-slimming README.md:41-43 (CIFAR-100: :81, :86, :93)
# NS's global prune percentage: README.md:49-51 (CIFAR-10: VGG 0.7, ResNet 0.4, DenseNet 0.4), :81-84
# (CIFAR-100 VGG: "Prune (50%)"), :86 and :93 (CIFAR-100 ResNet and DenseNet: 40%). Other datasets:
# CIFAR-10's.
NS_PRUNE_PERCENT = {
    "vgg": {"cifar10": 70.0, "cifar100": 50.0},
    "resnet": {"cifar10": 40.0},
    "densenet": {"cifar10": 40.0},
}
# NS fine-tunes the pruned model as long as it trained: README.md:58 (`--refine ... --epochs 160`).
NS_FINETUNE_EPOCHS = None  # a TrainConfig.finetune_epochs value: as many as `epochs`
FAST = {"batch_size": 512, "lr": 0.4, "warmup_epochs": 2.0, "dtype": "bfloat16"}


def ns_prune_percent(model: str, dataset: str) -> float:
    by_dataset = NS_PRUNE_PERCENT[model]
    return by_dataset.get(dataset, by_dataset["cifar10"])


def paper(
    model: str = "vgg", dataset: str = "cifar10", method: str = "prox", depth: int | None = None
) -> dict:
    """The paper's recipe for one model, dataset and method, as TrainConfig field values."""
    method = Method(method)
    l1, beta = PROX[model]
    values = {
        **PAPER_SGD,
        "model": model,
        "depth": depth or DEPTH[model],
        "dataset": dataset,
        "method": method.value,
        "l1": l1,
        "beta": beta,
        "prune_percent": None,
        "finetune_epochs": 0,
    }
    if method is Method.NS:
        values.update(
            l1=NS_L1[model],
            prune_percent=ns_prune_percent(model, dataset),
            finetune_epochs=NS_FINETUNE_EPOCHS,
        )
    if not method.uses_l1:
        values["l1"] = 0.0
    return values


def fast(
    model: str = "vgg", dataset: str = "cifar10", method: str = "prox", depth: int | None = None
) -> dict:
    """The paper recipe for an accelerator: batch 512 (8x), lr 0.4 (4x) reached over 2 warm-up epochs, bf16
    compute, the same 160 epochs, drops and sparsity objective.

    prox keeps l1 and scales beta by 0.1 / 0.4, so that beta * lr is the paper's. A fixed point of SGD
    (momentum mu) + palm_prox does not depend on lr or beta: beta * (gamma - xi) = l1 and a nonzero channel
    has loss gradient -(1 - mu) * l1 * sign(xi); a channel stays at xi = 0 iff |gradient| <= (1 - mu) * l1.
    What lr and beta set is how fast xi gets there: per step, gamma is pulled the fraction
    beta * lr / (1 + beta * lr) towards xi, and xi shrinks by l1 * lr / (1 + beta * lr), i.e. by
    l1 / (1 + beta * lr) per unit of lr * steps; equal beta * lr keeps both. (ista and ns shrink by lr * l1
    per step, the same per unit of lr * steps, so their l1 is kept too.) Tests: tests/test_recipes.py.
    """
    values = {**paper(model, dataset, method, depth), **FAST}
    values["beta"] = values["beta"] * PAPER_SGD["lr"] / FAST["lr"]
    return values


# demo: per-step shrinkage of the scales at lr 0.1: prox l1 / (1/lr + beta) = 0.0027, ista lr * l1 = 0.003
DEMO_L1 = {Method.PROX: 0.3, Method.ISTA: 0.03, Method.NS: 1e-3, Method.BASELINE: 0.0}


def demo(
    model: str = "vgg", dataset: str = "synthetic", method: str = "prox", depth: int | None = 11
) -> dict:
    """The whole pipeline in minutes on a laptop CPU: a narrow VGG-11 on a few thousand images (generated
    ones, or the first 3,000 of --data-dir) for 8 epochs, with a sparsity weight large enough to zero
    channels in so few steps (NS: prune 50%), then pruning and one fine-tuning epoch at lr 0.01."""
    values = paper(model, dataset, method, depth)
    values.update(
        widths=(16, 32, 64, 64, 128, 128, 128, 128),
        epochs=8,
        train_images=3000,
        synthetic_images=3000,
        finetune_epochs=1,
        finetune_lr=0.01,
        l1=DEMO_L1[Method(method)],
    )
    if Method(method).prunes_by_percent:
        values["prune_percent"] = 50.0
    return values


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named experiment: `build(method=...)` gives its TrainConfig field values; `method` is its own."""

    name: str
    build: Callable[..., dict]
    method: str = "prox"
    note: str = ""
    cpu_sized: bool = False  # runs in minutes on a CPU (no "no accelerator" estimate before it starts)

    def values(self, method: str | None = None) -> dict:
        return self.build(method=method or self.method)

    def config(self, method: str | None = None):
        """The recipe as a `palm_jax.train.TrainConfig` (for `method`, default the recipe's own)."""
        from palm_jax.train.config import TrainConfig

        return TrainConfig.from_dict(self.values(method))

    @property
    def summary(self) -> str:
        v = self.values()
        sparsity = {
            Method.PROX: f"l1 {v['l1']:g}, beta {v['beta']:g}",
            Method.ISTA: f"l1 {v['l1']:g}",
            Method.NS: f"l1 {v['l1']:g}",
            Method.BASELINE: "no sparsity",
        }[Method(v["method"])]
        pruning = "zero channels" if v["prune_percent"] is None else f"{v['prune_percent']:g}% of channels"
        tune = {0: "", None: ", fine-tune as many epochs"}.get(
            v["finetune_epochs"], f", fine-tune {v['finetune_epochs']} epochs"
        )
        text = (
            f"{v['model']}{v['depth']} on {v['dataset']}, {v['method']} ({sparsity}), {v['epochs']} epochs "
            f"of batch {v['batch_size']} at lr {v['lr']:g}{' ' + v['dtype'] if 'dtype' in v else ''}, "
            f"prune {pruning}{tune}"
        )
        return f"{text}; {self.note}" if self.note else text


REUSED = "l1 and beta are CIFAR-10's (the authors publish none for CIFAR-100)"


def _paper_recipes(dataset: str) -> list[Recipe]:
    note = REUSED if dataset == "cifar100" else ""
    build = lambda model, variant=paper: functools.partial(variant, model, dataset)
    recipes = [
        Recipe(f"{dataset}-vgg19", build("vgg"), note=note),
        Recipe(f"{dataset}-vgg19-ns", build("vgg"), method="ns"),
        Recipe(f"{dataset}-vgg19-baseline", build("vgg"), method="baseline"),
        Recipe(f"{dataset}-vgg19-fast", build("vgg", fast), note=note or "beta * lr as in the paper"),
        Recipe(f"{dataset}-resnet164", build("resnet"), note=note),
        Recipe(f"{dataset}-densenet40", build("densenet"), note=note),
    ]
    return [r for r in recipes if dataset == "cifar10" or not r.name.endswith("-fast")]


RECIPES = {
    r.name: r
    for r in [Recipe("demo", demo, cpu_sized=True), *_paper_recipes("cifar10"), *_paper_recipes("cifar100")]
}
# Run-directory name tags of the options that change what a recipe computes most often (the Makefile's
# variables): runs/<recipe>[-<data folder>][-e<epochs>][-n<train images>][-b<batch>]
RUN_NAME_TAGS = {"data_dir": "-", "epochs": "-e", "train_images": "-n", "batch_size": "-b"}


def resolve(recipe: str | None, overrides: dict):
    """(TrainConfig, run name): recipe `recipe` -- None: the paper recipe of `overrides`' model, dataset and
    method -- for `overrides`' method, with every field in `overrides` replaced. A `finetune_epochs` of None
    (as many as `epochs`) is resolved after the overrides, so `--epochs 2` shortens NS's fine-tuning too."""
    from palm_jax.train.config import ConfigError, TrainConfig

    method = overrides.get("method")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(
                f"--recipe {recipe!r} is not one of: {', '.join(RECIPES)} (list: palm-jax recipes)"
            )
        values, name = RECIPES[recipe].values(method), recipe
    else:
        model = TrainConfig.normalise_model(overrides.get("model", "vgg"))
        dataset = overrides.get("dataset", "cifar10")
        values = paper(model, dataset, method or "prox", overrides.get("depth"))
        name = f"{dataset}-{model}{values['depth']}-{values['method']}"
    cfg = TrainConfig.from_dict({**values, **overrides})
    return cfg.replace(finetune_epochs=cfg.finetune_epoch_count), name


def default_run_dir(name: str, overrides: dict) -> Path:
    """runs/<name> tagged with the RUN_NAME_TAGS options given, so that another setting is another run."""
    tags = ""
    for field, tag in RUN_NAME_TAGS.items():
        if overrides.get(field) is not None:
            value = overrides[field]
            tags += tag + (Path(value).resolve().name if field == "data_dir" else str(value))
    return Path("runs") / f"{name}{tags}"


if __name__ == "__main__":  # python -m palm_jax.recipes: the names, for the Makefile
    print(*RECIPES)
