"""Model builders by ``model.arch``: ``model.arch=<name>`` builds with ``dpbench.models.<name>.build``.

A model module (or package) declares its Hydra schema with ``@schema("model", "<name>_schema")`` and a
``build(cfg, rng, placement=None, abstract=False) -> ModelBundle``. A new model is that module plus
``conf/model/<name>.yaml``: nothing here lists them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType

import jax

from dpbench.models.base import ModelBundle


@functools.cache
def model_modules() -> dict[str, ModuleType]:
    """Every model module of ``dpbench.models`` (one with a ``build``), by ``model.arch`` name.

    >>> sorted(model_modules())
    ['cnn', 'encoder', 'gemma3']
    """
    import dpbench.models

    modules = {}
    for info in pkgutil.iter_modules(dpbench.models.__path__):
        module = importlib.import_module(f"dpbench.models.{info.name}")
        if callable(getattr(module, "build", None)):
            modules[info.name] = module
    return modules


def build_model(cfg, rng: jax.Array, placement=None, abstract: bool = False) -> ModelBundle:
    """``placement`` (dpbench.train.sharding.placement): where builders that take it put weights.
    ``abstract``: shapes only, for planning (``python -m dpbench.plan``): the bundle's parameters are
    ``jax.ShapeDtypeStruct`` leaves in the dtypes a real build stores them in; no weights are read or
    initialised (see each builder for what else it reads).

    The bundle trains what ``model.finetune`` trains; a DP method freezes more with ``with_frozen``."""
    modules = model_modules()
    if cfg.arch not in modules:
        raise ValueError(f"model.arch={cfg.arch!r} is not known; choose one of {', '.join(sorted(modules))}")
    return modules[cfg.arch].build(cfg, rng, placement=placement, abstract=abstract)
