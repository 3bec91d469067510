"""Devices and hosts for batch editing: jax.distributed, a 1-D "batch" mesh over the local
devices, and placing the sampler's inputs, state and weights on it (jax.jit + NamedSharding,
no pmap)."""

import os

import numpy as np

from flow.errors import InputError


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """jax.distributed: explicit (--coordinator ...) or automatic on a multi-host Cloud TPU.
    Must run before anything touches a JAX backend."""
    import jax

    if coordinator:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise InputError(
                f"--process_id {process_id} with --num_processes {num_processes}: each process "
                "needs an id in 0 .. num_processes - 1"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a pod slice: several hosts
        jax.distributed.initialize()


def local_mesh(batch_size: int):
    """A 1-D mesh ("batch") over as many local devices as divide the batch size."""
    import jax
    from jax.sharding import Mesh

    devices = jax.local_devices()
    n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    return Mesh(np.array(devices[:n]), ("batch",))


def _sharded(x, mesh, axis: int | None):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spec = [None] * np.ndim(x)
    if axis is not None:
        spec[axis] = "batch"
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))


def shard_inputs(inputs, mesh):
    """The per-image arrays split over the mesh on their batch axis, the rest replicated."""
    from mgjax.method.inputs import map_images

    inputs = map_images(inputs, lambda x, axis: _sharded(x, mesh, axis))
    return inputs.replace(schedule=_sharded(inputs.schedule, mesh, None))


def shard_state(state, mesh):
    return state.replace(
        z=_sharded(state.z, mesh, 0),
        keys=_sharded(state.keys, mesh, 0),
        step=_sharded(state.step, mesh, None),
    )


def one_edit(inputs, j: int):
    """Image j of batched inputs, on the host (numpy arrays)."""
    import jax

    from mgjax.method.inputs import map_images

    host = jax.tree_util.tree_map(np.asarray, inputs)
    return map_images(host, lambda x, axis: np.take(x, [j], axis=axis))


def replicate(tree, mesh):
    """Every leaf of `tree` (weights) placed whole on each device of the mesh."""
    import jax

    return jax.tree_util.tree_map(lambda x: _sharded(x, mesh, None), tree)
