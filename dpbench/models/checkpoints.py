"""What ``model.checkpoint`` may name, shared by every model loader.

``pkg:<module>``: weights shipped inside an installed Python package (offline); a hub id: fetched
with ``huggingface_hub`` only where the hub is reachable. Local paths are each loader's business.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

PKG_PREFIX = "pkg:"


def weights_package(checkpoint: str, install_hint: str) -> ModuleType | None:
    """The module that ``pkg:<module>`` names (None for any other checkpoint), or a clear error."""
    if not checkpoint.startswith(PKG_PREFIX):
        return None
    module_name = checkpoint[len(PKG_PREFIX) :]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model.checkpoint={checkpoint!r}: package module {module_name!r} is not installed "
            f"({install_hint})"
        ) from e


def hub_snapshot(
    checkpoint: str, patterns: list[str], local_alternatives: str, local_kind: str = "path"
) -> Path:
    """Download ``patterns`` of a hub repo; any failure (offline, gated, unknown repo) says what
    local path to give instead."""
    from huggingface_hub import snapshot_download  # only for hub ids

    try:
        return Path(snapshot_download(checkpoint, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(
            f"model.checkpoint={checkpoint!r} is not a local {local_kind} and the Hugging Face hub could not "
            f"provide it ({type(e).__name__}); set it to {local_alternatives}"
        ) from e
