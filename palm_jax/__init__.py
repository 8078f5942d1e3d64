"""palm_jax: proximal network slimming for JAX/Flax.

Train BatchNorm scales to exact zeros with an optax transform, then physically remove the channels.

    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9),
                     palm_jax.palm_prox(l1=4.5e-3, beta=100.0, learning_rate=lr))
    sparse = palm_jax.sparse_scales(params, opt_state)
    pruned = palm_jax.prune(model, {"params": sparse, "batch_stats": batch_stats})
    variables = palm_jax.recalibrate_bn(pruned.model, pruned.variables, train_images)   # BN statistics only

Names are imported lazily so that `import palm_jax` stays cheap and never pulls in TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "palm_prox": "palm_jax.prox",
    "soft_threshold": "palm_jax.prox",
    "l1_subgradient": "palm_jax.prox",
    "sparse_scales": "palm_jax.prox",
    "l1_penalty": "palm_jax.prox",
    "PalmProxState": "palm_jax.prox",
    "prune": "palm_jax.pruning",
    "PruneResult": "palm_jax.pruning",
    "save_pruned": "palm_jax.pruning",
    "load_pruned": "palm_jax.pruning",
    "PrunedCheckpointError": "palm_jax.pruning",
    "recalibrate_bn": "palm_jax.recalibrate",
    "models": "palm_jax.models",
    "export_model": "palm_jax.deploy",
    "load_exported": "palm_jax.deploy",
    "ExportError": "palm_jax.deploy",
    "measure_latency": "palm_jax.deploy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'palm_jax' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"palm_jax.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
