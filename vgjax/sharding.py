"""Data parallelism on JAX's own engine: one mesh with a "data" axis over all devices.

Batches are sharded along their first axis, everything else (params, optimizer state) is
replicated; `jax.jit` inserts the all-reduces, so the same code runs on 1 CPU, 8 GPUs or many
hosts. BatchNorm statistics are means over the *global* batch, exactly as on one device.
Multi-host: call `initialize_distributed()` first; each process passes its own slice of the
global batch to `shard_batch`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """jax.distributed.initialize() (cluster settings from the environment, e.g. SLURM, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    jax.distributed.initialize()


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Puts every leaf of `tree` on all devices."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of the global batch [N_local, ...] -> a global array sharded over
    the data axis. N_local must be divisible by the number of local devices."""
    local_devices = len(mesh.local_devices)
    if len(local_batch) % local_devices:
        raise ValueError(f"batch of {len(local_batch)} rows cannot be split evenly over "
                         f"{local_devices} local devices")
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)
