"""Data parallel training over all devices with `jax.sharding`: the state replicated, each batch split.

    mesh = make_mesh()                        # a 1-D Mesh over jax.devices(), axis "data"
    state = replicate(state, mesh)            # params, BN statistics, optimiser state (xi): a copy per device
    data = replicate(data, mesh)              # the uint8 training set: a full copy per device
    eval_data = shard_eval(eval_data, mesh)   # eval batches [nb, b, ...]: b split over "data" (one process)
    order = shard_batches(order, mesh)        # batch indices [K, B]: B split over "data"
    state, metrics = train_chunk(state, data, order, n, dtype=dtype)   # unchanged: jit + GSPMD split it

How it works: `train_chunk` gathers `data.images[batch_idx]`. With the dataset replicated and the indices
split on B, each device gathers, augments and runs its B / n images; no image crosses devices. XLA's
partitioner (GSPMD) adds the communication: BatchNorm's means over (N, H, W) become all-reduces, so the
batch statistics are those of the GLOBAL batch, as on one device, and the gradients of the replicated params
are summed over devices, so every device applies the same update. Crops and flips are the ones one device
draws (threefry random bits do not depend on the sharding). The results equal the 1-device run up to float
summation order (tests/test_sharding.py). The dataset is replicated rather than sharded because a random
batch gathered from a sharded dataset would be an all-to-all every step; CIFAR is 150 MB of uint8.

Multi-host (docs/multihost.md): start the same command on every host (one process per host) with
$JAX_COORDINATOR_ADDRESS (host 0's address and a free port), $JAX_NUM_PROCESSES and $JAX_PROCESS_ID, and call
`initialize_distributed()` before any other JAX call. `jax.devices()` then lists the devices of every
process and the mesh spans them all. Per-host data: every process loads the WHOLE dataset (the same files)
and `replicate` puts a copy on each of its devices; the batch indices are computed from the seed, identical
on every process, and `shard_batches` splits each batch over all devices in process order, so process p of P
runs columns [p B / P, (p + 1) B / P) of every batch on its devices. `place` builds each global array from
the process's own host values. Eval batches are replicated with several processes (see `shard_eval`).
On one process `initialize_distributed()` does nothing, so scripts can always call it:

    # host 0 of 2 (host 1: JAX_PROCESS_ID=1), same command otherwise
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m palm_jax.cli train
    # under Slurm or Open MPI the three are detected: initialize_distributed() alone is enough

tests/test_multihost.py runs 2 processes x 2 CPU devices on one machine (CPU collectives: gloo, JAX's
default) against a 1-device run.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from palm_jax.train.config import ConfigError
from palm_jax.train.step import EvalData

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> int:
    """Join a multi-process JAX run (`jax.distributed.initialize`); returns the number of processes.

    Arguments default to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID. Without a
    coordinator address and outside Slurm / Open MPI (which JAX detects itself) there is one process and
    nothing is done. Call it before any other JAX call; calling it again is a no-op.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    in_cluster = max(_env_int("SLURM_NTASKS") or 1, _env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1
    single = num_processes == 1 or (coordinator_address is None and not in_cluster)
    if single or jax.distributed.is_initialized():
        return jax.process_count()
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_count()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if hasattr(jax.sharding, "AxisType"):  # partitioned by GSPMD (jax.make_mesh would default to Explicit)
        return Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    return Mesh(devices, (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_on(mesh: Mesh, axis: int) -> NamedSharding:
    """Axis `axis` of an array divided over the "data" devices, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """A batch must split evenly over the devices; the error (a ConfigError) names the fix."""
    if batch_size % mesh.size:
        raise ConfigError(
            f"batch size {batch_size} does not split over the {mesh.size} devices of the data-parallel mesh; "
            f"use a --batch-size that is a multiple of {mesh.size} "
            f"(or fewer devices, e.g. CUDA_VISIBLE_DEVICES=0)"
        )


def replicate(tree, mesh: Mesh):
    """Every array leaf of `tree` (a TrainState, DeviceData, ...) as a copy on every device of `mesh`."""
    return jax.tree.map(lambda x: place(x, replicated(mesh)), tree)


def shard_batches(batch_idx, mesh: Mesh, axis: int = 1):
    """Batch indices [K, B] with B (axis `axis`) split over the devices: each device runs B / n images."""
    check_batch_size(batch_idx.shape[axis], mesh)
    return place(batch_idx, split_on(mesh, axis))


def shard_eval(eval_data: EvalData, mesh: Mesh) -> EvalData:
    """Eval batches [nb, b, ...] split on b when it divides evenly, replicated otherwise, and always with
    several processes: `evaluate` walks the batches on the host, which JAX allows for a global array only when
    every process holds all of it."""
    b = eval_data.labels.shape[1]
    split = b % mesh.size == 0 and jax.process_count() == 1
    sharding = split_on(mesh, 1) if split else replicated(mesh)
    return EvalData(*(place(x, sharding) for x in eval_data))


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (host or device array) laid out as `sharding`. With several processes each one passes the same
    values; a global array is resharded by a compiled copy."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
