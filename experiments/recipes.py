"""Experiment recipes as code: each is a function `method -> dict of palm_jax.train.TrainConfig fields`

The paper recipe (Bui et al. 2023, following Network Slimming, Liu et al. 2017): 160 epochs, batch 64, SGD
with momentum 0.9 and weight decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of training, pad-4 crop + flip.

    method    sparsity (l1, beta)                                       pruning                 fine-tune
    prox      VGG-19 (4.5e-3, 100), DenseNet-40 (4e-3, 100),            zero xi channels        optional
              ResNet-164 (2e-3, 0.25)
    ista      the same l1, soft-thresholded each step                   zero channels           optional
    ns        l1 1e-4 (VGG), 1e-5 (others), subgradient                  70% (VGG), 40% others   160 epochs
    baseline  none                                                      zero channels (none)    optional

`fast(...)` is the same method at batch 512 in bf16 for an accelerator (its docstring says how lr and beta are
scaled). `python -m palm_jax.cli train --recipe NAME` starts from RECIPES[NAME]; every option given on the
command line overrides the recipe's value. Without --recipe, `paper(model, depth, method, dataset)` is used.
"""

PAPER = {
    "epochs": 160,
    "batch_size": 64,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_drops": (0.5, 0.75),
}
DEPTH = {"vgg": 19, "resnet": 164, "densenet": 40}
PROX = {"vgg": (4.5e-3, 100.0), "densenet": (4e-3, 100.0), "resnet": (2e-3, 0.25)}  # (l1, beta)
NS_L1 = {"vgg": 1e-4, "densenet": 1e-5, "resnet": 1e-5}
NS_PRUNE_PERCENT = {"vgg": 70.0, "densenet": 40.0, "resnet": 40.0}
SAME_AS_EPOCHS = "epochs"  # a finetune_epochs value: as many as --epochs


def paper(
    model: str = "vgg", depth: int | None = None, method: str = "prox", dataset: str = "cifar10"
) -> dict:
    """The paper's recipe for one model, method and dataset."""
    l1, beta = PROX[model]
    values = {
        **PAPER,
        "model": model,
        "depth": depth or DEPTH[model],
        "dataset": dataset,
        "method": method,
        "l1": l1,
        "beta": beta,
        "finetune_epochs": 0,
        "prune_percent": None,
    }
    if method == "ns":
        values.update(l1=NS_L1[model], prune_percent=NS_PRUNE_PERCENT[model], finetune_epochs=SAME_AS_EPOCHS)
    if method == "baseline":
        values.update(l1=0.0)
    return values


FAST = {"batch_size": 512, "lr": 0.4, "warmup_epochs": 2.0, "dtype": "bfloat16"}


def fast(
    model: str = "vgg", depth: int | None = None, method: str = "prox", dataset: str = "cifar10"
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
    values = paper(model, depth, method, dataset)
    values.update(FAST)
    values["beta"] = values["beta"] * PAPER["lr"] / FAST["lr"]
    return values


def demo(method: str = "prox") -> dict:
    """The whole pipeline in minutes on a laptop CPU: a narrow VGG-11 on a few thousand images (generated
    ones, or the first 3,000 of --data-dir) for 8 epochs, with a sparsity weight large enough to zero
    channels in so few steps, then pruning and one fine-tuning epoch at lr 0.01."""
    values = paper("vgg", 11, method, "synthetic")
    values.update(
        widths=(16, 32, 64, 64, 128, 128, 128, 128),
        epochs=8,
        batch_size=64,
        train_images=3000,
        synthetic_images=3000,
        finetune_epochs=1,
        finetune_lr=0.01,
    )
    # per-step shrinkage of the scales at lr 0.1: prox l1 / (1/lr + beta) = 0.0027, ista lr * l1 = 0.003
    values["l1"] = {"prox": 0.3, "ista": 0.03, "ns": 1e-3, "baseline": 0.0}[method]
    if method == "ns":
        values["prune_percent"] = 50.0
    return values


def _recipe(model, depth, dataset, default_method="prox", recipe=paper):
    return lambda method=default_method: recipe(model, depth, method, dataset)


RECIPES = {
    "demo": demo,
    "cifar10-vgg19": _recipe("vgg", 19, "cifar10"),
    "cifar10-vgg19-ns": _recipe("vgg", 19, "cifar10", "ns"),
    "cifar10-vgg19-baseline": _recipe("vgg", 19, "cifar10", "baseline"),
    "cifar10-vgg19-fast": _recipe("vgg", 19, "cifar10", recipe=fast),
    "cifar10-resnet164": _recipe("resnet", 164, "cifar10"),
    "cifar10-densenet40": _recipe("densenet", 40, "cifar10"),
    "cifar100-vgg19": _recipe("vgg", 19, "cifar100"),
    "cifar100-vgg19-ns": _recipe("vgg", 19, "cifar100", "ns"),
    "cifar100-vgg19-baseline": _recipe("vgg", 19, "cifar100", "baseline"),
    "cifar100-resnet164": _recipe("resnet", 164, "cifar100"),
    "cifar100-densenet40": _recipe("densenet", 40, "cifar100"),
}
