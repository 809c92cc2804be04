"""Optimizers by ``optimizer.name``: one entry here plus one ``conf/optimizer/<name>.yaml`` adds one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

from dpbench.errors import ConfigError, check_choice
from dpbench.schema import schema


@schema("optimizer")
@dataclasses.dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    learning_rate: float = 0.1
    momentum: float | None = None  # sgd only
    weight_decay: float = 0.0  # adamw only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda cfg: optax.sgd(cfg.learning_rate, momentum=cfg.momentum),
    "adam": lambda cfg: optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "adamw": lambda cfg: optax.adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    ),
}


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optax transformation ``cfg`` (an ``optimizer`` config) names.

    >>> from dpbench.train.optimizers import OptimizerConfig
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


def check_settings(cfg) -> None:
    """The ``optimizer.*`` settings, before anything loads."""
    check_choice("optimizer.name", cfg.name, tuple(OPTIMIZERS))
