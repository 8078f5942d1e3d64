"""Deploying a (pruned) model: how much faster it runs, and a model-code-free export to serve it.

    latency = measure_latency((model, variables), (result.model, result.variables))   # latency.py
    print(latency_table(latency))

    export_model(result.model, result.variables, "deploy/vgg19", input_shape=(32, 32, 3),
                 mean=CIFAR_MEAN, std=CIFAR_STD)                                      # export.py
    export_checkpoint("runs/demo/pruned", "deploy/demo")                              # checkpoint.py
    serve = palm_jax.load_exported("deploy/demo")        # needs only jax: uint8 images -> float32 logits

Importing this package imports jax and numpy only; the training code is imported when a checkpoint is read.
"""

from palm_jax.deploy.checkpoint import export_checkpoint, load_checkpoint
from palm_jax.deploy.export import ExportedModel, ExportError, export_model, load_exported
from palm_jax.deploy.latency import latency_table, measure_latency, time_forward

__all__ = ["ExportError", "ExportedModel", "export_checkpoint", "export_model", "latency_table",
           "load_checkpoint", "load_exported", "measure_latency", "time_forward"]
