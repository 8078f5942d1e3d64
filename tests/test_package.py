"""The package's public names: `palm_jax.prune` is the function, whatever was imported before."""

import subprocess
import sys


def test_public_names_resolve_to_the_api_even_after_the_pruning_package_was_imported():
    code = (
        "import sys, palm_jax.train.experiment, palm_jax\n"
        "assert callable(palm_jax.prune) and palm_jax.prune.__module__ == 'palm_jax.pruning.api'\n"
        "assert callable(palm_jax.palm_prox) and callable(palm_jax.load_pruned)\n"
        "assert not any(m.startswith('tensorflow') for m in sys.modules), 'TensorFlow imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
