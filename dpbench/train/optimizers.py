"""Optimizers by ``optimizer.name``: one entry here plus one ``conf/optimizer/<name>.yaml`` adds one."""

from __future__ import annotations

from collections.abc import Callable

import optax

from dpbench.errors import ConfigError

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda cfg: optax.sgd(cfg.learning_rate, momentum=cfg.momentum),
    "adam": lambda cfg: optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "adamw": lambda cfg: optax.adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    ),
}


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optax transformation ``cfg`` (an ``optimizer`` config) names.

    >>> from dpbench.config import OptimizerConfig
    >>> make_optimizer(OptimizerConfig(name="lion"))
    Traceback (most recent call last):
    ...
    dpbench.errors.ConfigError: optimizer.name='lion' is not allowed; choose one of sgd, adam, adamw
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={cfg.name!r} is not allowed; choose one of {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[cfg.name](cfg)
