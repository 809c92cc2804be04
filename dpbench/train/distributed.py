"""Several processes (hosts) in one run: ``jax.distributed``, and which process writes what.

A job is multi-process when ``compute.coordinator_address``, ``compute.num_processes`` and
``compute.process_id`` are set (all three), or when SLURM started more than one task for it
(``SLURM_NTASKS`` > 1: ``jax.distributed.initialize()`` then reads SLURM's variables itself). Every
process then runs the same program on the same global mesh:

- the sampler's decision (which examples form each logical batch) is a function of (secret, step),
  identical everywhere; each process transfers only its rows of each physical batch
  (``dpbench.train.sharding.put_batch``);
- the privacy secret (``dpbench.privacy.randomness``) is process 0's, broadcast to every process and
  checked by hash, so the noise key ``fold_in(key(secret), step)`` is the same everywhere, and the
  noise is added to a replicated global sum inside one jitted step: one draw, not one per process;
  at the end every process compares a hash of its final parameters;
- checkpoints go through orbax, which coordinates the processes (one shared run folder);
- only process 0 writes results.json, history.jsonl and W&B, and logs at INFO (see :func:`side_path`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

_STARTED = {"done": False}


def _explicit(compute_cfg) -> tuple | None:
    values = tuple(compute_cfg.get(k) for k in ("coordinator_address", "num_processes", "process_id"))
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(
            "compute.coordinator_address, compute.num_processes and compute.process_id must be set "
            f"together (got {values[0]!r}, {values[1]!r}, {values[2]!r}); leave all three null for SLURM "
            "or one process"
        )
    if not 0 <= int(values[2]) < int(values[1]):
        raise ValueError(
            f"compute.process_id={values[2]} must lie in 0..compute.num_processes-1 ({values[1]})"
        )
    return values


def slurm_tasks() -> int:
    """How many tasks SLURM started for this job step (1 outside SLURM)."""
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)


def initialize(compute_cfg) -> bool:
    """Start ``jax.distributed`` if the config or SLURM says the job is multi-process; True if it is.

    Must run before anything touches a device. On CPU (tests, several local processes) the
    cross-process collectives use gloo.
    """
    explicit = _explicit(compute_cfg)
    if explicit is None and slurm_tasks() <= 1:
        return False
    if _STARTED["done"]:
        return True
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit is not None:
        address, count, index = explicit
        jax.distributed.initialize(
            coordinator_address=address, num_processes=int(count), process_id=int(index)
        )
    else:
        jax.distributed.initialize()  # reads SLURM_* (coordinator = first node of the allocation)
    _STARTED["done"] = True
    if not is_main():
        logging.getLogger("dpbench").setLevel(logging.WARNING)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def check_same_on_every_process(what: str, digest: str) -> None:
    """Raise unless every process holds the same ``digest`` (a hex SHA-256) of ``what``.

    Replicated parameters that differ between processes mean each process drew its own noise or
    batch: the published evaluation would then come from one process's view of a different mechanism.
    """
    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if not np.all(everyone == everyone[0]):
        raise RuntimeError(f"the processes hold different {what} (SHA-256 differs between processes)")


def is_main() -> bool:
    return jax.process_index() == 0


def side_path(path: str | Path) -> Path:
    """``path`` on process 0; on any other process the same name in a private scratch folder, so that
    only process 0 writes a run's records while every process runs the same code."""
    path = Path(path)
    if is_main():
        return path
    scratch = Path(tempfile.gettempdir()) / f"dpbench-process{jax.process_index()}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch / path.name
