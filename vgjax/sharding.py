"""Data parallelism on JAX's own engine: one mesh with a "data" axis over all devices.

Batches are sharded along their first axis, everything else (params, optimizer state) is
replicated; `jax.jit` inserts the all-reduces, so the same code runs on 1 CPU, 8 GPUs or many
hosts. BatchNorm statistics are means over the *global* batch, exactly as on one device.

Multi-process (several hosts, or several processes on one machine): `initialize_distributed`
(config.train) first. Then every process runs the same program; each passes its own rows of a
global batch to `shard_batch`, and results every process needs come back whole through
`gather` (jax.experimental.multihost_utils.process_allgather). Only the main process
(`is_main_process`) writes a run's files.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


# The settings of jax.distributed.initialize, and the environment variable of each.
DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                   "process_id": "JAX_PROCESS_ID"}


def distributed_settings(train_config) -> dict:
    """{coordinator_address, num_processes, process_id} from train.<key>, else its environment
    variable (DISTRIBUTED_ENV); {} when none is given (JAX then detects SLURM, TPU pods, ...).
    ValueError (one line, naming the setting) when only some are given or one is malformed."""
    given = {}
    for key, variable in DISTRIBUTED_ENV.items():
        value = train_config.get(key)
        source = f"train.{key}"
        if value is None or value == "":
            value, source = os.environ.get(variable, ""), f"${variable}"
        if value != "":
            given[key] = (value, source)
    if not given:
        return {}
    missing = [f"train.{key} (or ${variable})" for key, variable in DISTRIBUTED_ENV.items() if key not in given]
    if missing:
        raise ValueError(f"multi-process settings incomplete: {', '.join(missing)} missing while "
                         f"{', '.join(source for _, source in given.values())} is set")
    address, address_source = given["coordinator_address"]
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address_source}={address!r} is not host:port")
    settings = {"coordinator_address": str(address)}
    for key in ("num_processes", "process_id"):
        value, source = given[key]
        try:
            settings[key] = int(value)
        except ValueError:
            raise ValueError(f"{source}={value!r} is not an integer") from None
    if settings["num_processes"] < 1 or not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(f"{given['process_id'][1]}={settings['process_id']} is not in "
                         f"[0, {settings['num_processes']}) ({given['num_processes'][1]}={settings['num_processes']})")
    return settings


def initialize_distributed(train_config) -> None:
    """jax.distributed.initialize with `distributed_settings(train_config)` ({}: JAX's own
    cluster detection) and train.heartbeat_timeout_seconds (after which the others stop when a
    process died), once per process. On CPU, collectives between processes go through gloo."""
    if jax.distributed.is_initialized():  # launch.py initializes before experiment.run
        return
    settings = distributed_settings(train_config)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings, heartbeat_timeout_seconds=int(train_config.heartbeat_timeout_seconds))


def process_description() -> str:
    """"i of n": this process among all."""
    return f"{jax.process_index()} of {jax.process_count()}"


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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


def gather(array: jax.Array) -> np.ndarray:
    """The whole of a global array, as numpy, on every process (one process: np.asarray)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
