"""Where datasets live: ``paths.data_root``, one folder per dataset below it.

``paths.data_root`` is ``$DPBENCH_DATA`` when that is set, else ``../shared/data`` beside this
checkout when that folder exists, else null (no data root: loaders go on to TFDS and offline
fallbacks). Configs read it through the ``${dpbench_data_root:}`` resolver, so no config names a
machine's folders.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import OmegaConf

from dpbench import sweep_names
from dpbench.schema import schema

DATA_ROOT_ENV = "DPBENCH_DATA"
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding conf/ and dpbench/
SHARED_DATA = CHECKOUT.parent / "shared" / "data"
RESOLVER = "dpbench_data_root"


def default_data_root() -> str | None:
    """``$DPBENCH_DATA`` (absolute; if missing, loaders say so), else ../shared/data, else None."""
    from_env = os.environ.get(DATA_ROOT_ENV)
    if from_env:
        return os.path.abspath(from_env)
    if SHARED_DATA.is_dir():
        return str(SHARED_DATA)
    return None


def describe_missing_root() -> str:
    """Why there is no data root, for skip reasons and errors."""
    return f"paths.data_root is null (${DATA_ROOT_ENV} is not set and {SHARED_DATA} does not exist)"


def register_resolvers() -> None:
    """Make ``${dpbench_data_root:}`` and ``${dpbench_sweep_name:...}`` (the sweep folder's name,
    ``dpbench.sweep_names.sweep_name``) available to Hydra and OmegaConf (idempotent).

    The sweep name is cached: every job of a sweep copies the sweep's resolved cache (Hydra's
    ``load_sweep_config``), so a job's own overrides (``dp.epsilon=1``) never rename its folder.
    """
    OmegaConf.register_new_resolver(RESOLVER, default_data_root, replace=True)
    OmegaConf.register_new_resolver(
        sweep_names.RESOLVER, sweep_names.sweep_name, replace=True, use_cache=True
    )


@schema("paths")
@dataclasses.dataclass
class PathsConfig:
    """Where datasets are read from and where the run folder goes."""

    data_root: str | None = None  # ${dpbench_data_root:}: $DPBENCH_DATA, else ../shared/data if present
    output_dir: str = "outputs/manual"
