"""The mechanism a run trains under, decided once before training: sampler, σ, steps, δ, accountant.

The runner draws batches from ``Mechanism.sampler``, the accountant composes that sampler's own
``dp_event``, ``python -m dpbench.privacy`` prints it, and checkpoints store ``describe()`` so that
a resumed run can prove it continues the same mechanism (``differences``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig

from dpbench import config as config_lib
from dpbench.data import sampling
from dpbench.privacy import accounting

# Which setting decides each field of ``Mechanism.describe()``: named in errors on resume.
SETTING_OF_FIELD = {
    "method": "dp.method",
    "sampler": "dp.sampler",
    "num_examples": "the training set (dataset.*, audit.*): n",
    "sampling_rate": "runner.batch_size (q = batch_size / n)",
    "steps": "runner.steps / runner.epochs",
    "noise_multiplier": "dp.epsilon / dp.noise_multiplier",
    "delta": "dp.delta / dp.delta_exponent",
    "clip_norm": "dp.clip_norm",
    "accountant": "accountant.*",
    "randomness": "dp.randomness",
}


@dataclasses.dataclass
class Mechanism:
    """Everything that fixes the privacy guarantee, decided before training starts."""

    sampler: Any
    steps: int
    noise_multiplier: float | None  # None for dp.method=none
    delta: float | None
    method: str = "vanilla"
    clip_norm: float | None = None
    accountant: dict | None = None  # the accountant's name and parameters (None when non-private)
    randomness: str | None = None  # dp.randomness: secret | seeded (None when non-private)

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def bind(self, randomness) -> None:
        """Give the sampler its privacy randomness (a ``dpbench.privacy.randomness.PrivacyRandomness``)."""
        self.sampler.seed = randomness.batch_entropy()

    def describe(self) -> dict:
        """JSON-able, comparable description (stored with every checkpoint)."""
        return {
            "method": self.method,
            "sampler": self.sampler.name,
            "num_examples": self.sampler.num_examples,
            "sampling_rate": self.sampler.sampling_rate,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            "randomness": self.randomness,
        }


def differences(saved: dict, current: dict) -> list[str]:
    """One phrase per field of two ``describe()`` dicts that differ, naming the setting behind it.

    >>> differences({"steps": 10, "delta": 1e-5}, {"steps": 20, "delta": 1e-5})
    ['steps: checkpoint 10, this run 20 (set by runner.steps / runner.epochs)']
    """
    return [
        f"{field}: checkpoint {saved.get(field)!r}, this run {current.get(field)!r} "
        f"(set by {SETTING_OF_FIELD.get(field, field)})"
        for field in sorted(set(saved) | set(current))
        if saved.get(field) != current.get(field)
    ]


def _accountant_description(cfg: DictConfig) -> dict:
    if cfg.accountant.name == "pld":
        return {"name": "pld", "value_discretization_interval": cfg.accountant.value_discretization_interval}
    if cfg.accountant.name == "prv":
        delta_error = cfg.accountant.delta_error  # None: δ/1000
        return {
            "name": "prv",
            "eps_error": float(cfg.accountant.eps_error),
            "delta_error": None if delta_error is None else float(delta_error),
        }
    orders = cfg.accountant.orders
    return {"name": cfg.accountant.name, "orders": None if orders is None else [float(o) for o in orders]}


def plan_mechanism(cfg: DictConfig, num_examples: int) -> Mechanism:
    """Sampler, logical steps and σ (calibrated from ε, or given) for a training set of ``num_examples``.

    Raises ``ConfigError`` naming the setting when the batch is larger than the data, when the
    steps/epochs setting gives no logical step, or when the accountant cannot account the sampler.
    """
    config_lib.validate_batch_size(cfg, num_examples)
    # The sampler's seed is bound later, from the privacy randomness (Mechanism.bind).
    sampler = sampling.make_sampler(cfg.dp.sampler, num_examples, cfg.runner.batch_size, seed=None)
    if cfg.runner.steps is not None:
        steps = int(cfg.runner.steps)
    else:
        steps = sampler.steps_for_epochs(cfg.runner.epochs)
        if steps < 1:
            one_step = 1 / sampler.steps_for_epochs(1.0)
            raise config_lib.ConfigError(
                f"runner.epochs={cfg.runner.epochs} gives 0 logical steps (n={num_examples}, "
                f"runner.batch_size={cfg.runner.batch_size}); choose runner.epochs >= {one_step:.3g} "
                "or set runner.steps (an integer >= 1) with runner.epochs=null"
            )
    if cfg.dp.method == "none":
        return Mechanism(sampler, steps, None, None, method="none")
    try:
        accounting.check_supported(sampler, cfg.accountant)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    delta = config_lib.resolve_delta(cfg, num_examples)
    if cfg.dp.noise_multiplier is not None:
        sigma = float(cfg.dp.noise_multiplier)
    else:
        sigma = accounting.calibrate_noise_multiplier(sampler, steps, cfg.dp.epsilon, delta, cfg.accountant)
    if not math.isfinite(sigma):
        raise config_lib.ConfigError(
            f"σ={sigma} is not finite; dp.epsilon and dp.noise_multiplier must be finite numbers > 0"
        )
    return Mechanism(
        sampler,
        steps,
        sigma,
        delta,
        method=cfg.dp.method,
        clip_norm=float(cfg.dp.clip_norm),
        accountant=_accountant_description(cfg),
        randomness=cfg.dp.randomness,
    )
