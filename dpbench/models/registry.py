"""Model builders by ``model.arch``; imports of heavy model code happen only when chosen."""

from __future__ import annotations

import importlib

import jax

from dpbench.models.base import ModelBundle

_BUILDERS = {
    "cnn": ("dpbench.models.cnn", "build_cnn"),
    "encoder": ("dpbench.models.encoder", "build_encoder"),
    "gemma3": ("dpbench.models.gemma3", "build_gemma3"),
}
PLACED = ("gemma3", "encoder")  # builders that place their weights by sharding rule themselves


def build_model(cfg, rng: jax.Array, placement=None, abstract: bool = False) -> ModelBundle:
    """``placement`` (dpbench.train.sharding.placement): where builders that take it put weights.
    ``abstract``: shapes only, for planning (``python -m dpbench.plan``): the bundle's parameters are
    ``jax.ShapeDtypeStruct`` leaves in the dtypes a real build stores them in; no weights are read or
    initialised (see each builder for what else it reads).

    The bundle trains what ``model.finetune`` trains; a DP method freezes more with ``with_frozen``."""
    if cfg.arch not in _BUILDERS:
        raise ValueError(f"model.arch={cfg.arch!r} is not known; choose one of {', '.join(_BUILDERS)}")
    module_name, fn_name = _BUILDERS[cfg.arch]
    extra = {"placement": placement} if placement is not None and cfg.arch in PLACED else {}
    builder = getattr(importlib.import_module(module_name), fn_name)
    return builder(cfg, rng, abstract=abstract, **extra)
