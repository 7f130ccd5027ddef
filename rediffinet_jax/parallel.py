"""Device mesh and shardings: one ``data`` axis over every device of every process.

Parameters and optimizer state are replicated; batches are split on their first axis. The same code
runs on one CPU, several GPUs, or several hosts (after :func:`maybe_initialize_distributed`).
"""

from __future__ import annotations

import contextlib
import os
import uuid

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# A process that stops answering (one that failed and left) ends the others after this long; JAX's
# default kept a failed run's other processes waiting for minutes.
HEARTBEAT_S = 30
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's distributed runtime when coordinator settings are given (arguments or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment), or inside a Slurm job
    of several tasks (JAX's cluster auto-detection); returns whether it did.
    On CPU the gloo collectives are selected so that several processes can be tested on one machine.
    """
    env = {k: os.environ.get(k) for k in _COORDINATOR_VARS}
    coordinator = coordinator or env["JAX_COORDINATOR_ADDRESS"]
    if not coordinator:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # JAX reads the rest from Slurm's environment
            jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_S)
            return True
        return False
    num_processes = num_processes if num_processes is not None else int(env["JAX_NUM_PROCESSES"] or 1)
    process_id = process_id if process_id is not None else int(env["JAX_PROCESS_ID"] or 0)
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=HEARTBEAT_S)
    return True


def make_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over all devices (all processes)."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assembles this process's batch (leading axis = per-process batch) into global sharded arrays."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def per_process_batch(global_size: int) -> int:
    """The batch each process loads; the global batch must split evenly over devices and processes."""
    n_dev = jax.device_count()
    if global_size % n_dev:
        raise ValueError(f"global batch {global_size} is not divisible by the {n_dev} devices")
    return global_size // jax.process_count()


def to_host(x) -> np.ndarray:
    """A replicated (or local) array as numpy; on several processes, this process's copy."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def shared_id() -> str:
    """A fresh random hex id, the same on every process (process 0's, broadcast): a record that several
    processes return or compare (a training's ``run``) must not differ between them."""
    token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return token.astype(np.uint8).tobytes().hex()


def is_main() -> bool:
    """Whether this is process 0, the one that writes the files every process shares (records, caches,
    tables, label maps); the others compute alongside it and read."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Returns once every process has reached the barrier ``name`` (at once with one process). Every
    process must pass the same barriers in the same order; JAX checks that the names agree, so a name
    holds no absolute path (hosts may mount the work directory at different places)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_first(name: str):
    """Process 0 runs the block first and the others after it (a :func:`barrier` between): for steps that
    make shared files only if they are missing (phantoms, splits, the cache, stage settings), so that the
    others find them made and only read them, never write the same files at the same time. Process 0
    reaches the barrier even if its block raises; the others then run the block and meet the error too."""
    if not is_main():
        barrier(name)
        yield
        return
    try:
        yield
    finally:
        barrier(name)
