"""Optimizers by ``optimizer.name``: one entry here plus one ``conf/optimizer/<name>.yaml`` adds one.

``adam_bc`` / ``adamw_bc`` are DP-AdamBC (Tang et al. 2024, "DP-AdamBC: Your DP-Adam Is Actually
DP-SGD (Unless You Apply Bias Correction)"): Adam's second moment of a noisy gradient estimates
E[g²] + Φ, where Φ = (σC/B)² is the variance the mechanism adds to each coordinate of the averaged
gradient. Under DP noise Φ dominates, so Adam's denominator becomes the constant √Φ and Adam turns
into SGD with momentum. DP-AdamBC subtracts the known Φ: the update is
m̂ / (ε + √max(v̂ − Φ, γ')), with γ' (``optimizer.variance_floor``) keeping the denominator away from 0.
Φ is a function of public quantities (σ, C, the expected batch size), so it costs no privacy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpbench.errors import ConfigError, check_choice
from dpbench.schema import schema

BIAS_CORRECTED = ("adam_bc", "adamw_bc")


@schema("optimizer")
@dataclasses.dataclass
class OptimizerConfig:
    """The optax optimizer that takes each logical step's noisy mean gradient."""

    name: str = "sgd"  # sgd | adam | adamw | adam_bc | adamw_bc (DP-AdamBC: Adam minus the DP noise variance)
    learning_rate: float = 0.1
    momentum: float | None = None  # sgd only
    weight_decay: float = 0.0  # adamw and adamw_bc only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # adam_bc / adamw_bc: γ', the floor of the corrected second moment max(v̂ − (σC/B)², γ') (Tang et al.)
    variance_floor: float = 5e-8


class ScaleByAdamBCState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_bc(
    noise_variance: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, variance_floor: float = 5e-8
) -> optax.GradientTransformation:
    """Adam's scaling with the second moment corrected by the per-coordinate noise variance Φ.

    With Φ = 0 (no noise to correct) this is ``optax.scale_by_adam`` itself.

    >>> import jax.numpy as jnp
    >>> g = {"w": jnp.array([0.3, -0.02])}
    >>> bc = scale_by_adam_bc(0.01)
    >>> updates, _ = bc.update(g, bc.init(g))
    >>> [round(float(u), 3) for u in updates["w"]]  # 0.3/√(0.09 − 0.01); −0.02/√γ': v̂ < Φ hits the floor
    [1.061, -89.439]
    """
    if noise_variance == 0:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return ScaleByAdamBCState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        scaled = jax.tree_util.tree_map(
            lambda m, v: m / (eps + jnp.sqrt(jnp.maximum(v - noise_variance, variance_floor))), mu_hat, nu_hat
        )
        return scaled, ScaleByAdamBCState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def _adam_bc(cfg, noise_variance: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    return optax.chain(
        scale_by_adam_bc(noise_variance, cfg.b1, cfg.b2, cfg.eps, cfg.variance_floor),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(cfg.learning_rate),
    )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda cfg, noise_variance: optax.sgd(cfg.learning_rate, momentum=cfg.momentum),
    "adam": lambda cfg, noise_variance: optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "adamw": lambda cfg, noise_variance: optax.adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    ),
    "adam_bc": lambda cfg, noise_variance: _adam_bc(cfg, noise_variance),
    "adamw_bc": lambda cfg, noise_variance: _adam_bc(cfg, noise_variance, cfg.weight_decay),
}


def make_optimizer(cfg, noise_variance: float = 0.0) -> optax.GradientTransformation:
    """The optax transformation ``cfg`` (an ``optimizer`` config) names. ``noise_variance``: the
    variance the mechanism adds to each coordinate of the gradient the optimizer sees, (σC/B)²
    (used by ``adam_bc`` / ``adamw_bc`` only).

    >>> from dpbench.train.optimizers import OptimizerConfig
    >>> make_optimizer(OptimizerConfig(name="lion"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dpbench.errors.ConfigError: optimizer.name='lion' is not allowed; choose one of sgd, adam, adamw, ...
    """
    check_choice("optimizer.name", cfg.name, tuple(OPTIMIZERS))
    return OPTIMIZERS[cfg.name](cfg, noise_variance)


def check_settings(cfg, private: bool, noise: str) -> None:
    """The ``optimizer.*`` settings (with the DP method's privacy and noise kind), before anything loads."""
    check_choice("optimizer.name", cfg.name, tuple(OPTIMIZERS))
    if not cfg.learning_rate > 0:
        raise ConfigError(f"optimizer.learning_rate={cfg.learning_rate} is not allowed; choose a number > 0")
    if cfg.name in BIAS_CORRECTED:
        plain = cfg.name.removesuffix("_bc")
        if not private:
            raise ConfigError(
                f"optimizer.name={cfg.name} subtracts the DP noise variance, and dp=none adds no noise; "
                f"choose optimizer={plain}"
            )
        if noise != "iid":
            raise ConfigError(
                f"optimizer.name={cfg.name} corrects i.i.d. noise of variance (σC/B)²; correlated noise "
                f"(dp.method with {noise} noise) has another variance each step: choose dp=vanilla, or "
                f"optimizer={plain}"
            )
        if not cfg.variance_floor > 0:
            raise ConfigError(
                f"optimizer.variance_floor={cfg.variance_floor} is not allowed; "
                "choose a number > 0 (e.g. 5e-8)"
            )
