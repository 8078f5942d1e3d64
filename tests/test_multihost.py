"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices joined by `initialize_distributed`.

Each process is started as a host would be (same command, $JAX_COORDINATOR_ADDRESS on 127.0.0.1,
$JAX_NUM_PROCESSES, its $JAX_PROCESS_ID; CPU collectives over gloo, JAX's default) and runs the library's
path on the 4-device mesh: `replicate` (every process holds the whole dataset), `shard_batches` (the same
global batch indices on every process, each device taking its slice), `train_chunk` (4 palm_prox steps),
`shard_eval` + `evaluate`, and a `Checkpoints` save / restore in a shared folder. The parameters must equal a
single-process 1-device run on the same global batches, computed here while the two processes run.
The processes are killed after TIMEOUT_S, or once one fails (its peer would otherwise wait minutes for it).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_sharding import result_arrays, run_chunks, tiny_setup

TIMEOUT_S = 150  # about 30 s on 2 idle cores
TREES = ("['params']", "['batch_stats']", "['xi']", "['loss']")


def _worker(out_dir: Path):
    import jax

    from palm_jax.train import Checkpoints, sharding
    from palm_jax.train.state import create_train_state, make_optimizer
    from palm_jax.train.step import evaluate, to_eval_batches

    assert sharding.initialize_distributed() == 2  # from the JAX_* environment, as on a cluster
    assert (jax.device_count(), jax.local_device_count()) == (4, 2), jax.devices()
    mesh = sharding.make_mesh()
    cfg, dataset, model, variables, order = setup = tiny_setup()
    state, metrics, chunk, idx = run_chunks(*setup, mesh=mesh)
    eval_data = sharding.shard_eval(to_eval_batches(dataset.eval_images, dataset.eval_labels, 8), mesh)
    evaluation = evaluate(state.apply_fn, state.variables(), eval_data)

    checkpoints = Checkpoints(out_dir / "checkpoints", keep=1)
    checkpoints.save(1, state, {}, {"eval_accuracy": evaluation["accuracy"]})
    checkpoints.wait()
    fresh = create_train_state(model, make_optimizer(cfg, 100), variables, seed=0)
    restored, meta = checkpoints.restore(fresh)
    checkpoints.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b.addressable_data(0))) for a, b in
               zip(jax.tree.leaves(restored.checkpoint_tree()), jax.tree.leaves(state.checkpoint_tree()),
                   strict=True))
    np.savez(
        out_dir / f"{jax.process_index()}.npz",
        **result_arrays(state, metrics, ""),
        eval_loss=evaluation["loss"],
        all_reduce="all-reduce" in chunk.as_text(),
        # the [rows, columns] of the batch indices this process's devices hold
        columns=np.array([[s.index[1].start, s.index[1].stop] for s in idx.addressable_shards]),
        restored_equal=same and meta["epoch"] == 1,
        sealed=(out_dir / "checkpoints" / "1" / "digests.json").is_file(),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_hosts(out_dir: Path, reference) -> None:
    """Start both processes, run `reference()` meanwhile, and wait for them (bounded); each must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    logs = [out_dir / f"{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir)],
                                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=f,
                                              stderr=subprocess.STDOUT))
        reference()
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: its peer would wait for it at the next collective
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"exit status {p.returncode} (-9: killed):\n{log.read_text()[-3000:]}"


def test_two_processes_equal_one_process(tmp_path):
    from palm_jax.train.step import evaluate, to_eval_batches

    one = {}

    def reference():  # a plain single-process run on 1 device, in this process
        setup = tiny_setup()
        state, metrics, _, _ = run_chunks(*setup)
        one.update(result_arrays(state, metrics, ""))
        eval_data = to_eval_batches(setup[1].eval_images, setup[1].eval_labels, 8)
        one["eval_loss"] = evaluate(state.apply_fn, state.variables(), eval_data)["loss"]

    _run_hosts(tmp_path, reference)
    hosts = []
    for i in range(2):
        with np.load(tmp_path / f"{i}.npz", allow_pickle=False) as f:
            hosts.append({key: f[key] for key in f.files})
    for i, host in enumerate(hosts):
        for key in (k for k in one if k.startswith(TREES)):
            np.testing.assert_allclose(host[key], one[key], rtol=1e-4, atol=1e-6, err_msg=f"{i}: {key}")
        np.testing.assert_allclose(float(host["eval_loss"]), one["eval_loss"], rtol=1e-4)
        # the batch of 16 split over 4 devices: process 0's hold columns 0-8, process 1's columns 8-16
        assert sorted(map(tuple, host["columns"].tolist())) == [(8 * i, 8 * i + 4), (8 * i + 4, 8 * i + 8)]
        assert bool(host["all_reduce"]) and bool(host["restored_equal"]) and bool(host["sealed"])
    assert any(k.startswith("['xi']") and (one[k] == 0).any() for k in one), "prox must zero some xi"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
