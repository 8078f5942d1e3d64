"""What one experiment run is: a frozen, JSON-serialisable config, checked before anything heavy happens."""

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp

METHODS = ("prox", "ns", "ista", "baseline")
MODELS = ("vgg", "resnet", "densenet")
MODEL_ALIASES = {"preresnet": "resnet"}
DATASETS = ("cifar10", "cifar100", "svhn", "synthetic")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Fields that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = ("steps_per_dispatch", "keep_checkpoints")


class ConfigError(ValueError):
    """A bad option; the message names it and says what is allowed."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run: model, data, sparsity method, optimiser recipe, pruning and fine-tuning.

    The optimiser is SGD with momentum and weight decay; the learning rate starts at `lr` (reached linearly
    over the first `warmup_epochs` of training, 0: none) and is divided by 10 at each fraction of training in
    `lr_drops`. `l1` is the sparsity weight (ignored by `baseline`), `beta`
    the PALM coupling of `prox`. `prune_percent` prunes that global percentage of channels by |scale| (NS);
    None prunes the channels whose scale (or xi) is exactly zero. Fine-tuning the pruned model (no sparsity)
    starts at `finetune_lr` (default `lr`) with the same drops. `steps_per_dispatch` None picks 1 on CPU
    and up to 100 on accelerators. `dtype` is the compute dtype; params, BN statistics and xi stay float32.
    """

    model: str = "vgg"
    depth: int = 19
    widths: tuple[int, ...] | None = None
    growth_rate: int = 12
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_images: int | None = None
    synthetic_images: int = 2000
    method: str = "prox"
    l1: float = 4.5e-3
    beta: float = 100.0
    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    warmup_epochs: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    steps_per_dispatch: int | None = None
    eval_batch_size: int = 500
    keep_checkpoints: int = 2
    prune_percent: float | None = None
    finetune_epochs: int = 0
    finetune_lr: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "lr_drops", tuple(float(f) for f in self.lr_drops))
        self.validate()

    def validate(self) -> None:
        _choice("--model", self.model, MODELS)
        _choice("--dataset", self.dataset, DATASETS)
        _choice("--method", self.method, METHODS)
        _choice("--dtype", self.dtype, tuple(DTYPES))
        for name in (
            "depth",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "keep_checkpoints",
            "synthetic_images",
        ):
            _positive(name, getattr(self, name))
        _positive("lr", self.lr)
        if self.finetune_lr is not None:
            _positive("finetune_lr", self.finetune_lr)
        for name in ("train_images", "steps_per_dispatch"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        for name in ("l1", "weight_decay", "momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.method != "baseline" and self.l1 == 0:
            raise ConfigError(
                f"--l1 must be > 0 for --method {self.method} (use --method baseline for no sparsity)"
            )
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.prune_percent is not None and not 0 <= self.prune_percent < 100:
            raise ConfigError(
                f"--prune-percent must be a percentage in [0, 100), e.g. 70, got {self.prune_percent}"
            )
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if any(not 0 < f < 1 for f in self.lr_drops):
            raise ConfigError(f"lr_drops must be fractions of training in (0, 1), got {self.lr_drops}")
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ConfigError(
                f"--train-images ({self.train_images}) must be at least --batch-size ({self.batch_size})"
            )

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read run config {path}: {err}") from err
        return cls.from_dict(values)

    def resume_mismatch(self, saved: "TrainConfig") -> list[str]:
        """Fields that differ from the saved run's config in a way that changes the computation."""
        return [
            f"{f.name}: saved {getattr(saved, f.name)!r}, now {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in RESUMABLE_CHANGES and getattr(self, f.name) != getattr(saved, f.name)
        ]


def _choice(option: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")
