"""Training pipeline: config, train state, compiled steps, the loop, checkpoints, metrics, plots, report.

cfg = palm_jax.recipes.RECIPES["cifar10-vgg19"].config()      # or TrainConfig(model="vgg", depth=19, ...)
report_path = run_experiment(cfg, "runs/cifar10-vgg19")        # train -> prune -> (fine-tune) -> report
"""

from palm_jax.train.checkpoint import CheckpointError, Checkpoints
from palm_jax.train.config import ConfigError, TrainConfig
from palm_jax.train.experiment import RunDirError, load_data, run_experiment
from palm_jax.train.loop import Inputs, TrainingDiverged, fit
from palm_jax.train.state import TrainState, build_model, create_train_state, make_optimizer, sparse_params
from palm_jax.train.step import evaluate, train_chunk, train_step

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "ConfigError",
    "Inputs",
    "RunDirError",
    "TrainConfig",
    "TrainState",
    "TrainingDiverged",
    "build_model",
    "create_train_state",
    "evaluate",
    "fit",
    "load_data",
    "make_optimizer",
    "run_experiment",
    "sparse_params",
    "train_chunk",
    "train_step",
]
