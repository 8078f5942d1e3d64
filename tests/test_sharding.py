"""Data parallel training: train_chunk on a 4-device mesh equals the 1-device run (palm_jax.train.sharding).

The comparison runs in a subprocess with 4 virtual CPU devices (XLA_FLAGS must be set before JAX starts);
it writes its results to an npz file that this process checks.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

WIDTHS = (4, 8, 8, 8, 16, 16, 16, 16)  # a tiny VGG-11
BATCH, IMAGES = 16, 64  # 4 steps
L1 = 12.0  # with BN scales spread over [0.1, 1], palm_prox zeroes the smaller ones of xi within 4 steps


O0 = {"xla_backend_optimization_level": 0}  # programs that run twice here: compile fast


def tiny_setup():
    """(config, dataset, model, host variables with BN scales spread over [0.1, 1], data order [4, 16])."""
    import jax

    from palm_jax.data import epoch_order, synthetic_dataset
    from palm_jax.train.config import TrainConfig
    from palm_jax.train.state import build_model, init_variables

    cfg = TrainConfig(model="vgg", depth=11, widths=WIDTHS, batch_size=BATCH, l1=L1)
    dataset = synthetic_dataset(num_train=IMAGES, num_eval=16)
    model = build_model(cfg, dataset.num_classes)
    variables = jax.device_get(init_variables(model, 0, dataset.train_images.shape[1:]))
    for layer in variables["params"].values():
        if "scale" in layer:
            layer["scale"] = np.linspace(0.1, 1.0, layer["scale"].size, dtype=np.float32)
    return cfg, dataset, model, variables, epoch_order(jax.random.PRNGKey(1), IMAGES, BATCH)


def run_chunks(cfg, dataset, model, variables, order, mesh=None):
    """Two dispatches of two palm_prox steps of the library's `train_chunk` (as the loop runs an epoch in
    chunks), data parallel over `mesh` when given. Returns (state, last chunk's metrics, the compiled chunk,
    the placed batch indices)."""
    import jax.numpy as jnp

    from palm_jax.train import sharding
    from palm_jax.train.state import create_train_state, make_optimizer
    from palm_jax.train.step import to_device, train_chunk

    state = create_train_state(model, make_optimizer(cfg, 100), variables, seed=0)
    data, idx = to_device(dataset.train_images, dataset.train_labels), order
    if mesh is not None:
        state, data = sharding.replicate(state, mesh), sharding.replicate(data, mesh)
        idx = sharding.shard_batches(order, mesh)
    chunk = train_chunk.lower(state, data, idx[:2], jnp.int32(2), dtype=jnp.float32).compile(O0)
    state, _ = chunk(state, data, idx[:2], jnp.int32(2))
    state, metrics = chunk(state, data, idx[2:], jnp.int32(2))
    return state, metrics, chunk, idx


def result_arrays(state, metrics, prefix: str) -> dict:
    """{prefix + "['params']['conv0']['kernel']": host array, ...} of params, batch_stats, xi and the losses
    (a replicated array is read from this process's first device)."""
    import jax

    from palm_jax import prox

    xi = prox.sparse_scales(state.params, state.opt_state)
    tree = {"params": state.params, "batch_stats": state.batch_stats, "xi": xi, "loss": metrics["loss"]}
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _worker(out_path):
    import jax

    from palm_jax.train import sharding

    assert jax.device_count() == 4, jax.devices()
    setup = tiny_setup()
    one = result_arrays(*run_chunks(*setup)[:2], "one")
    mesh = sharding.make_mesh()
    state, metrics, chunk, idx = run_chunks(*setup, mesh=mesh)
    results = {
        "all_reduce": "all-reduce" in chunk.as_text(),
        # a chunk sliced off the sharded order keeps B split
        "chunk_split": idx[2:].sharding.spec == sharding.split_on(mesh, 1).spec,
        "state_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
    }
    try:
        sharding.shard_batches(setup[-1][:, :6], mesh)
        results["bad_batch_error"] = ""
    except ValueError as err:
        results["bad_batch_error"] = str(err)
    np.savez(out_path, **one, **result_arrays(state, metrics, "four"),
             **{k: np.array(v) for k, v in results.items()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "runs.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def _pairs(runs, prefix):
    keys = sorted(k[len("one"):] for k in runs if k.startswith("one" + prefix))
    assert keys, prefix
    return [(k, runs["one" + k], runs["four" + k]) for k in keys]


@pytest.mark.parametrize("tree", ["['params']", "['batch_stats']", "['xi']", "['loss']"])
def test_four_devices_equal_one_device(runs, tree):
    for key, one, four in _pairs(runs, tree):
        np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-6, err_msg=key)


def test_prox_zeros_are_the_same(runs):
    xi = [pair for pair in _pairs(runs, "['xi']") if pair[0].endswith("['scale']")]
    zeros_one = np.concatenate([one.ravel() == 0 for _, one, _ in xi])
    zeros_four = np.concatenate([four.ravel() == 0 for _, _, four in xi])
    assert 0 < zeros_one.sum() < zeros_one.size, "the test needs some but not all scales at exactly zero"
    np.testing.assert_array_equal(zeros_four, zeros_one)


def test_batch_is_split_and_state_replicated(runs):
    # Equality alone would also hold if every device ran the whole batch: the program must communicate
    # (BN statistics and gradients summed over devices), the chunks keep B split, the state stays replicated.
    assert bool(runs["all_reduce"])
    assert bool(runs["chunk_split"])
    assert bool(runs["state_replicated"])


def test_batch_size_must_split_over_devices(runs):
    assert "batch size 6 does not split over the 4 devices" in str(runs["bad_batch_error"])


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    from palm_jax.train import sharding

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() == 1
    assert sharding.initialize_distributed(num_processes=1) == 1


if __name__ == "__main__":
    _worker(sys.argv[1])
