"""What one run is: a frozen, JSON-serialisable config, checked before anything heavy happens, and the rules
by which each phase of a run (training, fine-tuning the pruned model) derives its own settings from it.

Every field carries its help text (`dataclasses.field(metadata=...)`): the command line's options are made
from the fields (`palm_jax.cli`), so a field added here is an option there.
"""

import dataclasses
import json
import math
import typing
from pathlib import Path

import jax.numpy as jnp

from palm_jax import recipes
from palm_jax.data.sources import DATASETS
from palm_jax.methods import METHODS, Method
from palm_jax.models import VGG, DenseNet, PreResNet
from palm_jax.utils import atomic_write

MODELS = {"vgg": VGG, "resnet": PreResNet, "densenet": DenseNet}
MODEL_ALIASES = {"preresnet": "resnet"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
XI_INITS = ("uniform",)  # besides None: xi starts as a copy of the scales
PHASES = ("train", "finetune")  # in the order a run computes them
PHASE_NAMES = {"train": "training", "finetune": "fine-tuning"}
PATH_FIELDS = ("data_dir",)  # compared resolved: DATA_DIR/ and DATA_DIR are the same folder

# Fields that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = ("steps_per_dispatch", "keep_checkpoints")
# Fields that change only what follows training (pruning, fine-tuning): a --resume that changes them reuses
# the training checkpoints and redoes the rest.
AFTER_TRAINING = ("prune_percent", "recalibrate_images", "finetune_epochs", "finetune_lr")


# the Makefile variable of each setting that has one (Makefile: train_args), and how a value is worded
MAKE_VARIABLES = {
    "data_dir": "DATA_DIR", "epochs": "EPOCHS", "batch_size": "BATCH", "train_images": "TRAIN_IMAGES"
}
SETTING_WORDS = {"train_images": "{:,} training images", "batch_size": "batch size {}", "epochs": "{} epochs"}


class ConfigError(ValueError):
    """A bad option; the message names it and says what is allowed.

    `settings` ({field: value}) are the TrainConfig fields the message is about; for each, `message` holds
    `{field}`, written as the option and its value (`--batch-size 64`), or by `explain(given)` the way the
    setting was made: given on the command line, or set by the recipe ("the recipe's 3,000 training images;
    set TRAIN_IMAGES= (or --train-images)")."""

    def __init__(self, message: str, settings: dict | None = None):
        self.template, self.settings = message, dict(settings or {})
        super().__init__(self.explain())

    def explain(self, given=None) -> str:
        """The message; `given`: the fields set on the command line (None: unknown, every setting is written
        as its option); the others are the recipe's, named with how to set them."""
        text, fixes = self.template, []
        for name, value in self.settings.items():
            if given is None or name in given:
                shown = f"{_flag(name)} {value}"
            else:
                words = SETTING_WORDS.get(name, name.replace("_", " ") + " {}")
                shown = "the recipe's " + words.format(value)
                make = MAKE_VARIABLES.get(name)
                fixes.append(f"set {make}= (or {_flag(name)})" if make else f"set {_flag(name)}")
            text = text.replace("{" + name + "}", shown)
        return text + "".join(f"; {fix}" for fix in fixes)


def option(default, help: str, **metadata):
    """A config field with its command-line help; `choices` (a tuple) restricts the value."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


_L1, _BETA = recipes.PROX["vgg"]
_SGD = recipes.PAPER_SGD


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run: model, data, sparsity method, optimiser recipe, pruning and fine-tuning.

    The defaults are the paper's VGG-19 / CIFAR-10 / prox recipe (`palm_jax.recipes`, recipe cifar10-vgg19).
    The optimiser is SGD with momentum and weight decay; the learning rate starts at `lr` (reached linearly
    over the first `warmup_epochs`) and is divided by 10 at each fraction of training in `lr_drops`. Each
    phase trains with `for_phase(phase)`; an epoch visits every training image once, the last batch smaller.
    """

    model: str = option("vgg", "network", choices=tuple(MODELS))
    depth: int = option(
        recipes.DEPTH["vgg"], "network depth (VGG 11/13/16/19, PreResNet 9n+2, DenseNet 3n+4)"
    )
    widths: tuple[int, ...] | None = option(
        None, "comma-separated output width of every conv (a narrow model)"
    )
    growth_rate: int = option(12, "DenseNet growth rate")
    dataset: str = option("cifar10", "dataset (synthetic: generated images)", choices=tuple(DATASETS))
    data_dir: str | None = option(
        None, "folder with train.npz [test.npz] [extra.npz] (none: downloaded once)"
    )
    train_images: int | None = option(None, "use only the first N training images (a quick look)")
    synthetic_images: int = option(2000, "number of generated training images (--dataset synthetic)")
    method: Method = option(
        Method.PROX,
        "sparsity method: prox (PALM), ns (Network Slimming), ista (soft threshold) or baseline (none)",
        choices=METHODS,
    )
    l1: float = option(_L1, "sparsity weight on sum |BN scale|")
    beta: float = option(_BETA, "PALM coupling weight of the scales to xi (prox)")
    xi_init: str | None = option(
        None,
        "prox: xi's start; none: the scales' values, uniform: U(0.47, 0.53) per "
        "channel as in the authors' code",
        choices=XI_INITS,
    )
    epochs: int = option(_SGD["epochs"], "training epochs")
    batch_size: int = option(_SGD["batch_size"], "training batch size")
    lr: float = option(_SGD["lr"], "initial learning rate")
    momentum: float = option(_SGD["momentum"], "SGD momentum")
    weight_decay: float = option(
        _SGD["weight_decay"], "weight decay (on every parameter, as in the originals)"
    )
    lr_drops: tuple[float, ...] = option(
        _SGD["lr_drops"],
        "comma-separated fractions of training at which the "
        "lr is divided by 10 (0.5,0.75: epochs 80 and 120 of 160)",
    )
    warmup_epochs: float = option(0.0, "reach --lr linearly over this many epochs of training")
    seed: int = option(0, "seed of initialisation, data order and augmentation (fine-tuning: seed + 1)")
    dtype: str = option(
        "float32", "compute dtype (params, BN statistics and xi stay float32)", choices=tuple(DTYPES)
    )
    steps_per_dispatch: int | None = option(
        None, "train steps per compiled call (none: 1 on CPU, up to 100 on accelerators)"
    )
    eval_batch_size: int = option(500, "evaluation batch size")
    keep_checkpoints: int = option(2, "training checkpoints kept (besides the best)")
    prune_percent: float | None = option(
        None,
        "prune this global %% of channels by |scale| (NS); none: exactly the zero channels (xi for prox)",
    )
    finetune_epochs: int | None = option(
        0, "fine-tune the pruned model for N epochs (0: not at all; none: as many as --epochs)"
    )
    finetune_lr: float | None = option(None, "initial learning rate of fine-tuning (none: --lr)")
    recalibrate_images: int = option(
        3000, "after pruning, re-estimate the BatchNorm statistics on this many training images (at most "
        "all of them; 0: not at all); see palm_jax.recalibrate"
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("model", self.normalise_model(self.model))
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        set_("method", Method(self.method))
        if self.widths is not None:
            set_("widths", tuple(int(w) for w in self.widths))
        set_("lr_drops", tuple(float(f) for f in self.lr_drops))
        self.validate()

    @staticmethod
    def normalise_model(model: str) -> str:
        model = MODEL_ALIASES.get(model, model)
        _choice("--model", model, tuple(MODELS))
        return model

    def validate(self) -> None:
        _choice("--dataset", self.dataset, tuple(DATASETS))
        _choice("--dtype", self.dtype, tuple(DTYPES))
        if self.xi_init is not None:
            _choice("--xi-init", self.xi_init, XI_INITS)
        for name in (
            "depth",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "keep_checkpoints",
            "synthetic_images",
            "lr",
            "growth_rate",
        ):
            _positive(name, getattr(self, name))
        for name in ("train_images", "steps_per_dispatch", "finetune_lr"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not (isinstance(self.recalibrate_images, int) and self.recalibrate_images >= 0):
            raise ConfigError(
                f"--recalibrate-images must be an int >= 0 (0: off), got {self.recalibrate_images!r}")
        if self.finetune_epochs is not None and self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        for name in ("l1", "weight_decay", "momentum", "warmup_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.method.uses_l1 and self.l1 == 0:
            raise ConfigError(
                f"--l1 must be > 0 for --method {self.method} (use --method baseline for no sparsity)"
            )
        _positive("beta", self.beta)
        if self.prune_percent is not None and not 0 <= self.prune_percent < 100:
            raise ConfigError(
                f"--prune-percent must be a percentage in [0, 100), e.g. 70, got {self.prune_percent}"
            )
        if self.method.prunes_by_percent and self.prune_percent is None:
            raise ConfigError(
                f"--method {self.method} needs --prune-percent (its scales are small, never exactly "
                "zero; the ns recipes set Network Slimming's: palm-jax recipes NAME)"
            )
        if any(not 0 < f < 1 for f in self.lr_drops):
            raise ConfigError(f"--lr-drops must be fractions of training in (0, 1), got {self.lr_drops}")
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ConfigError("{batch_size} exceeds {train_images}",
                              {"batch_size": self.batch_size, "train_images": self.train_images})

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def finetune_epoch_count(self) -> int:
        """Epochs of fine-tuning: `finetune_epochs`, or as many as `epochs` when it is None."""
        return self.epochs if self.finetune_epochs is None else self.finetune_epochs

    def for_phase(self, phase: str) -> "TrainConfig":
        """The settings phase `phase` trains with; the one place for the per-phase rules.

        "train": this config. "finetune" (the pruned model): no sparsity (method baseline, l1 0), lr
        `finetune_lr` (None: `lr`) without warm-up, `finetune_epoch_count` epochs, seed + 1 (its own data
        order and augmentation), nothing more to prune. The originals fine-tune with their training settings
        too (network-slimming main.py:100-103 `--refine`: the same optimiser, lr schedule and epochs).
        """
        _choice("phase", phase, PHASES)
        if phase == "train":
            return self
        return self.replace(
            method=Method.BASELINE,
            l1=0.0,
            lr=self.finetune_lr or self.lr,
            warmup_epochs=0.0,
            epochs=self.finetune_epoch_count,
            seed=self.seed + 1,
            prune_percent=None,
            finetune_epochs=0,
            finetune_lr=None,
            xi_init=None,
        )

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["method"] = self.method.value
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known: {sorted(known)}")
        values = dict(values)
        for name in ("widths", "lr_drops"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read run config {path}: {err}") from err
        return cls.from_dict(values)

    def changed_fields(self, saved: "TrainConfig") -> list[str]:
        """The fields that differ from the saved run's config in a way that changes the computation (paths
        compared resolved)."""
        def same(name, now, then) -> bool:
            if name in PATH_FIELDS and now is not None and then is not None:
                return Path(now).resolve() == Path(then).resolve()
            return now == then

        return [f.name for f in dataclasses.fields(self) if f.name not in RESUMABLE_CHANGES
                and not same(f.name, getattr(self, f.name), getattr(saved, f.name))]

    def resume_mismatch(self, saved: "TrainConfig") -> list[str]:
        """"field: saved X, now Y" for each field that differs from the saved run's in a way that changes its
        training (`changed_fields` but AFTER_TRAINING)."""
        return [f"{name}: saved {getattr(saved, name)!r}, now {getattr(self, name)!r}"
                for name in self.changed_fields(saved) if name not in AFTER_TRAINING]


def option_fields() -> list[tuple[dataclasses.Field, type, bool]]:
    """(field, value type, may be None) of every TrainConfig field, for building command-line options."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        kind = next((a for a in args if a is not type(None)), hints[f.name]) if optional else hints[f.name]
        out.append((f, kind, optional))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(option: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{_flag(name)} must be > 0, got {value!r}")
