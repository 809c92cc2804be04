"""The mechanism a run trains under, decided once before training: batch selection, noise strategy,
clip norm, σ, logical steps, δ and the accountant.

``plan_mechanism`` builds it once from the config. The runner draws batches from
``Mechanism.sampler`` and noise from ``Mechanism.noise_transform``; the accountant composes the
sampler's own ``dp_event`` (which, for balls-in-bins participation, carries the noise strategy's
sensitivity); ``python -m dpbench.privacy`` and ``dpbench.plan`` print it; checkpoints and records
store ``describe()``, so a resumed run can prove it continues the same mechanism (``differences``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from omegaconf import DictConfig

from dpbench import config as config_lib
from dpbench.privacy import accounting
from dpbench.privacy import batch_selection as sampling
from dpbench.privacy import noise as noise_lib
from dpbench.privacy.methods import METHODS

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
    "noise": "dp.method, dp.bands, dp.buffers, dp.optimize_strategy",
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
    strategy: noise_lib.Strategy = dataclasses.field(default_factory=noise_lib.Strategy)

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def expected_batch_size(self) -> float:
        """What the noisy sum is divided by: the sampler's mean batch size (data-independent)."""
        sampler = self.sampler
        return float(getattr(sampler, "expected_batch_size", None) or sampler.batch_size)

    def dp_event(self, steps: int | None = None):
        """The accounting event of the first ``steps`` logical steps (default: the whole run)."""
        return self.sampler.dp_event(self.noise_multiplier, self.steps if steps is None else steps)

    def noise_transform(self, key):
        """The noise transform of this run (``dpbench.privacy.noise``), keyed by the privacy randomness."""
        if not self.private:
            return None
        return self.strategy.transform(self.noise_multiplier * self.clip_norm, key)

    def epsilon_tracker(self, accountant: DictConfig) -> accounting.EpsilonTracker | None:
        """ε spent after each logical step under ``accountant``, refusing steps past the budget."""
        if not self.private:
            return None
        return accounting.EpsilonTracker(
            self.sampler, self.noise_multiplier, self.delta, accountant, budgeted_steps=self.steps
        )

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
            "noise": self.strategy.describe() if self.private else None,
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


def _sampler(cfg: DictConfig, num_examples: int):
    try:
        return sampling.make_sampler(
            cfg.dp.sampler,
            num_examples,
            cfg.runner.batch_size,
            seed=None,
            cycle_length=cfg.dp.get("bands", 1),
        )
    except ValueError as error:
        if cfg.dp.sampler == "cyclic_poisson":
            most = max(1, num_examples // cfg.runner.batch_size)
            raise config_lib.ConfigError(
                f"dp.bands={cfg.dp.bands} groups of runner.batch_size={cfg.runner.batch_size} do not fit in "
                f"n={num_examples} examples (dp.sampler=cyclic_poisson); choose dp.bands in [1, {most}]"
            ) from None
        raise config_lib.ConfigError(str(error)) from None


def _strategy(cfg: DictConfig, sampler, steps: int) -> noise_lib.Strategy:
    """The noise strategy ``dp.method`` names, fitted to this run (``dp.optimize_strategy``)."""
    kind = METHODS[cfg.dp.method].noise
    optimize = bool(cfg.dp.get("optimize_strategy", True))
    if kind == "bandmf":
        if cfg.dp.bands > steps:
            raise config_lib.ConfigError(
                f"dp.bands={cfg.dp.bands} is more than the run's {steps} logical steps; "
                f"choose dp.bands in [1, {steps}]"
            )
        return noise_lib.bandmf(steps, int(cfg.dp.bands), optimize)
    if kind == "blt":
        strategy = noise_lib.blt(steps, sampler.cycle_length, int(cfg.dp.buffers), optimize)
        # Balls-in-bins: no amplification; the event is one Gaussian at σ / this sensitivity.
        sampler.sensitivity_squared = functools.lru_cache(maxsize=None)(
            lambda t: strategy.minsep_sensitivity_squared(t, sampler.cycle_length)
        )
        return strategy
    if sampler.name == "balls_in_bins":
        sampler.sensitivity_squared = None  # independent noise: k participations, each sensitivity C
    return noise_lib.Strategy("iid", steps)


def plan_mechanism(cfg: DictConfig, num_examples: int) -> Mechanism:
    """Sampler, logical steps, noise strategy and σ (calibrated from ε, or given) for a training set
    of ``num_examples``.

    Raises ``ConfigError`` naming the setting when the batch is larger than the data, when the
    steps/epochs setting gives no logical step, when the strategy does not fit the run, or when the
    accountant cannot account the sampler.
    """
    config_lib.validate_batch_size(cfg, num_examples)
    # The sampler's seed is bound later, from the privacy randomness (Mechanism.bind).
    sampler = _sampler(cfg, num_examples)
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
    strategy = _strategy(cfg, sampler, steps)
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
        strategy=strategy,
    )
