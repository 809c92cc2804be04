"""``load_dataset(cfg)``: the one entry point from a dataset config to a ``Dataset``.

``dataset.name=<name>`` loads the module ``dpbench.data.<name>``, which declares ``SOURCES`` (the
``dataset.source`` values it accepts, "auto" first) and ``load(cfg) -> Dataset``. A new dataset is
that module plus ``conf/dataset/<name>.yaml``: nothing here lists them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Any

from dpbench.data.base import Dataset
from dpbench.data.schema import hold_out_validation, validate_config


@functools.cache
def dataset_modules() -> dict[str, ModuleType]:
    """Every dataset module of ``dpbench.data`` (one that declares ``SOURCES`` and ``load``), by name.

    >>> sorted(dataset_modules())
    ['mnist', 'samsum', 'sst2']
    """
    import dpbench.data

    modules = {}
    for info in pkgutil.iter_modules(dpbench.data.__path__):
        module = importlib.import_module(f"dpbench.data.{info.name}")
        if hasattr(module, "SOURCES") and callable(getattr(module, "load", None)):
            modules[info.name] = module
    return modules


def load_dataset(cfg: Any) -> Dataset:
    """Load the dataset that ``cfg`` (a ``DatasetConfig`` or the matching Hydra node) names.

    Raises ``ValueError`` listing the allowed names and, per dataset, the allowed sources.
    """
    modules = dataset_modules()
    allowed = "; ".join(f"{name}: {'|'.join(m.SOURCES)}" for name, m in sorted(modules.items()))
    if cfg.name not in modules:
        raise ValueError(
            f"dataset.name={cfg.name!r} is not allowed; choose one of {', '.join(sorted(modules))} "
            f"(dataset.name: dataset.source -> {allowed})"
        )
    module = modules[cfg.name]
    try:
        validate_config(cfg, module.SOURCES)
    except ValueError as error:
        raise ValueError(f"{error} (allowed dataset.name: dataset.source -> {allowed})") from error
    return hold_out_validation(module.load(cfg), cfg)
