"""Several processes, one mesh: ``jax.distributed`` set-up and the host-side edges of a global computation.

Launched as N processes (one per host, or several on one host), every process runs the same program;
``jax.devices()`` then lists every process's devices, the mesh spans them all, and each process restores
only the shards of its own devices (checkpoint.py reads ``addressable_devices_indices_map``). Values made
on the host (token ids, initial latents, schedule tables) are the same in every process and enter the
global computation replicated (:func:`to_global`); results come back to every host with
:func:`to_host`; only process 0 writes files (:func:`is_main`).
"""
from __future__ import annotations

import numpy as np


class DistributedError(ValueError):
    pass


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               local_device_ids: str | None = None) -> bool:
    """Join the job. Explicit settings (``--coordinator host:port --num-processes N --process-id I``), or
    ``coordinator="auto"``: JAX detects the cluster (TPU pod, SLURM, Open MPI, Kubernetes). Returns whether
    this is a multi-process run. Must run before any other JAX call. On CPU, collectives go over gloo.
    ``local_device_ids`` ("0,1"): the devices of this host this process uses, for several processes on
    one GPU host (otherwise each would claim every GPU)."""
    if coordinator is None:
        return False
    import jax

    ids = parse_device_ids(local_device_ids)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPU/TPU use their own
    try:
        if coordinator == "auto":
            jax.distributed.initialize(local_device_ids=ids)
        else:
            if num_processes is None or process_id is None:
                raise DistributedError("--coordinator: also give --num-processes and --process-id")
            if not 0 <= process_id < num_processes:
                raise DistributedError(f"--process-id: {process_id} is not in [0, {num_processes})")
            jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=ids)
    except (RuntimeError, ValueError) as e:
        if isinstance(e, DistributedError):
            raise
        raise DistributedError(f"--coordinator {coordinator}: cannot join the job ({str(e).splitlines()[0]})") from None
    return jax.process_count() > 1


def parse_device_ids(text: str | None) -> list[int] | None:
    """"0,1" -> [0, 1]; None -> None (every local device)."""
    if text is None:
        return None
    try:
        ids = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DistributedError(f"--local-device-ids: {text!r} is not a comma-separated list of integers") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise DistributedError(f"--local-device-ids: {text!r}: give distinct device numbers >= 0")
    return ids


def is_main() -> bool:
    import jax

    return jax.process_index() == 0


def multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def to_global(x, mesh):
    """A host value (numpy, Python scalar, or a single-device array) as an array replicated over the whole
    mesh; arrays already spread over the mesh pass through. One process: unchanged (JAX places it)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None or not multi_process():
        return x
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == mesh.devices.size:
        return x
    if x is None:
        return x
    return jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec()))


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly global) array on this host."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
