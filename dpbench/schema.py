"""Config schemas, each declared beside the code it configures and registered there.

A module that reads a config group declares the group's dataclass with ``@schema("group")``
(option YAMLs in ``conf/<group>/`` start with ``defaults: [<group>_schema, _self_]``, so Hydra
checks their keys and types against it). :func:`dpbench.config.register_configs` puts every
declared schema into Hydra's ConfigStore; nothing else lists them.
"""

from __future__ import annotations

SCHEMAS: dict[tuple[str, str], type] = {}


def schema(group: str, name: str | None = None):
    """Class decorator: ``cls`` is the schema of config group ``group`` (stored as ``<group>_schema``,
    or ``name`` where a group has several, as ``model`` has one per architecture)."""

    def register(cls: type) -> type:
        SCHEMAS[(group, name or f"{group}_schema")] = cls
        return cls

    return register


def store_all() -> None:
    """Put every declared schema into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for (group, name), cls in SCHEMAS.items():
        store.store(group=group, name=name, node=cls)
