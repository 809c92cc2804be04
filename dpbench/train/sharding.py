"""Data parallelism: a one-axis ``data`` mesh; batches are split on it, parameters replicated.

Under ``jax.jit`` with these shardings, a sum over the batch axis is a global sum that XLA
completes with one all-reduce; the code never calls ``psum`` itself, so it cannot sum twice, and
the noise (computed from a replicated key on replicated arrays) is the same single draw everywhere.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"compute.num_devices={num_devices} but {len(devices)} device(s) are visible; "
                f"choose 1..{len(devices)}"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict, mesh: Mesh) -> dict:
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
