"""Rematerialisation (``model.remat``): the ``jax.checkpoint`` policies, and the XLA flag they need on CPU.

XLA:CPU expands ``jax.checkpoint``'s optimization barriers and CSE then undoes the recomputation, so on
CPU remat saves memory only with :data:`CPU_KEEP_REMAT` in ``XLA_FLAGS`` (``python -m dpbench.plan``
sets it for its compile, as GPU/TPU compilers keep the barriers).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger("dpbench")

POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation (no remat)
    "full": "nothing_saveable",  # keep only each block's inputs
    "dots": "dots_saveable",  # keep matmul outputs, recompute the elementwise rest
    "dots_no_batch": "dots_with_no_batch_dims_saveable",  # keep weight matmuls, not attention ones
}

CPU_KEEP_REMAT = "--xla_disable_hlo_passes=cse_barrier_expander"


def check(remat: str) -> None:
    """``model.remat`` must name a policy (one line naming the allowed values)."""
    if remat not in POLICIES:
        raise ValueError(f"model.remat={remat!r} is not known; choose one of {', '.join(POLICIES)}")


def warn_if_ineffective(remat: str) -> None:
    """Say so when ``model.remat`` will save nothing because XLA:CPU drops its barriers."""
    if (
        remat != "none"
        and jax.default_backend() == "cpu"
        and CPU_KEEP_REMAT not in os.environ.get("XLA_FLAGS", "")
    ):
        log.warning(
            "model.remat=%s saves no memory on XLA:CPU unless XLA_FLAGS contains %s (set it before starting)",
            remat,
            CPU_KEEP_REMAT,
        )
