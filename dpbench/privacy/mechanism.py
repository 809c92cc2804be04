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
import logging
import math
from typing import Any

from omegaconf import DictConfig

from dpbench.errors import ConfigError, as_config_error, check_choice
from dpbench.privacy import accounting
from dpbench.privacy import adaptive_clip as adaptive_clip_lib
from dpbench.privacy import batch_selection as sampling
from dpbench.privacy import clipping as clipping_lib
from dpbench.privacy import noise as noise_lib
from dpbench.privacy import units as units_lib
from dpbench.privacy.methods import CLIPPING_CHOICES, METHODS, check_clipping_dtype, resolve_clipping
from dpbench.privacy.randomness import MODES as RANDOMNESS_MODES
from dpbench.schema import schema

log = logging.getLogger("dpbench")


@schema("dp")
@dataclasses.dataclass
class DPConfig:
    """The privacy mechanism. ``epsilon`` xor ``noise_multiplier``: the other is derived."""

    # none | vanilla | ffa (LoRA with A frozen) | ghost (vanilla, ghost clipping) | bandmf | blt
    # (DP-FTRL with correlated noise: banded matrix factorization, buffered linear Toeplitz)
    method: str = "vanilla"
    # How the clipped sum is computed: per_example | ghost | bookkeeping | auto (the fastest measured).
    # A performance knob: every choice is exact, so it never changes ε or the result.
    clipping: str = "auto"
    epsilon: float | None = 1.0  # the (ε, δ) target: σ is calibrated to spend exactly this
    noise_multiplier: float | None = None  # set it (and epsilon=null) to report the ε it gives
    delta: float | None = 1e-5  # δ of the claim; null with delta_exponent set
    delta_exponent: float | None = None  # δ = n^-exponent (dp-lora uses 1.1); needs delta=null
    clip_norm: float = 1.0  # C: every example contributes a gradient of norm <= C (the sensitivity)
    # fixed: each example's gradient times min(1, C/‖g‖); automatic: times C/(‖g‖+clip_gamma), AUTO-S of
    # Bu et al. 2023. Norm <= C either way: the same sensitivity and ε (dpbench/privacy/clipping.py).
    clip_fn: str = "fixed"

    clip_gamma: float = 0.01  # γ of clip_fn=automatic (> 0): how much less small gradients are scaled up
    # C follows a quantile of the gradient norms (dpbench/privacy/adaptive_clip.py); dp.clip_norm is C₀.
    adaptive_clip: adaptive_clip_lib.AdaptiveClipConfig = dataclasses.field(
        default_factory=adaptive_clip_lib.AdaptiveClipConfig
    )
    sampler: str = "poisson"  # poisson | shuffle | cyclic_poisson (dp.bands groups) | balls_in_bins
    # Correlated noise (dpbench/privacy/noise.py). bands: BandMF's bands, and the groups of
    # sampler=cyclic_poisson; buffers: BLT's most buffers; optimize_strategy: fit the strategy to the
    # run's length with jax_privacy's optimisers (false: closed-form coefficients, instant).
    bands: int = 4
    buffers: int = 4
    optimize_strategy: bool = True
    # Where batch selection and noise get their randomness (dpbench/privacy/randomness.py): secret = a
    # per-run 256-bit secret from the OS, stored owner-only in the run folder and never published;
    # seeded = a hash of runner.seed and the mechanism (reproducible from the record: tests, debugging;
    # the claim then does not hold against anyone who knows runner.seed).
    randomness: str = "secret"
    secret_file: str | None = None  # reuse a stored secret (a run folder's privacy_secret): bit for bit
    # What the guarantee protects (dpbench/privacy/units.py): example | user. user: users are sampled,
    # counted and clipped (a user's gradient is the mean of their examples'); needs dataset.user_key.
    unit: str = "example"
    max_examples_per_user: int = 8  # dp.unit=user: a user's further examples are dropped before training


def check_settings(cfg: DictConfig) -> None:
    """The ``dp.*`` settings (with the model and run length they depend on), before anything loads."""
    dp = cfg.dp
    check_choice("dp.method", dp.method, tuple(METHODS))
    check_choice("dp.sampler", dp.sampler, sampling.SAMPLER_NAMES)
    check_choice("dp.clipping", dp.clipping, CLIPPING_CHOICES)
    check_choice("dp.randomness", dp.randomness, RANDOMNESS_MODES)
    if dp.secret_file is not None and dp.randomness != "secret":
        raise ConfigError(
            f"dp.secret_file={dp.secret_file} needs dp.randomness=secret (got dp.randomness={dp.randomness})"
        )
    units_lib.check_settings(cfg)
    if not METHODS[dp.method].private:
        return
    as_config_error(resolve_clipping, dp.method, dp.clipping)
    # Ghost in bfloat16 is not exact: refused here, before any weights load.
    check_clipping_dtype(dp.method, dp.clipping, cfg.model.get("dtype"))
    _check_correlated_noise(cfg)
    if dp.epsilon is None and dp.noise_multiplier is None:
        raise ConfigError("set dp.epsilon (σ is calibrated) or dp.noise_multiplier (ε is computed)")
    if dp.epsilon is not None and dp.noise_multiplier is not None:
        raise ConfigError(
            f"dp.epsilon={dp.epsilon} and dp.noise_multiplier={dp.noise_multiplier} are both set; "
            "set one and null the other (e.g. dp.epsilon=null dp.noise_multiplier=1.1)"
        )
    if dp.epsilon is not None and not dp.epsilon > 0:
        raise ConfigError(f"dp.epsilon={dp.epsilon} must be > 0")
    if dp.noise_multiplier is not None and not dp.noise_multiplier > 0:
        raise ConfigError(f"dp.noise_multiplier={dp.noise_multiplier} must be > 0")
    if (dp.delta is None) == (dp.delta_exponent is None):
        raise ConfigError("set exactly one of dp.delta (a number in (0, 1)) and dp.delta_exponent (δ = n^-e)")
    if dp.delta is not None and not 0 < dp.delta < 1:
        raise ConfigError(f"dp.delta={dp.delta} must lie in (0, 1)")
    if dp.delta_exponent is not None and not dp.delta_exponent > 0:
        raise ConfigError(f"dp.delta_exponent={dp.delta_exponent} must be > 0")
    if not dp.clip_norm > 0:
        raise ConfigError(f"dp.clip_norm={dp.clip_norm} must be > 0")
    check_choice("dp.clip_fn", dp.clip_fn, clipping_lib.CLIP_FNS)
    adaptive_clip_lib.check_settings(dp.adaptive_clip, dp.clip_fn, METHODS[dp.method].noise)
    if dp.clip_fn == "automatic" and not dp.clip_gamma > 0:
        raise ConfigError(f"dp.clip_gamma={dp.clip_gamma} is not allowed; choose a number > 0 (e.g. 0.01)")
    if METHODS[dp.method].frozen_labels and cfg.model.get("finetune", "lora") != "lora":
        raise ConfigError(
            f"dp.method={dp.method} freezes LoRA's A matrices: it needs model.finetune=lora "
            f"(got model.finetune={cfg.model.finetune})"
        )
    if METHODS[dp.method].frozen_labels and cfg.model.get("lora_rank", 0) <= 0:
        raise ConfigError(
            f"dp.method={dp.method} freezes LoRA's A matrices: it needs a model with model.lora_rank > 0"
        )


def _check_correlated_noise(cfg: DictConfig) -> None:
    """The sampler a method can be accounted under, and the strategy's sizes."""
    dp = cfg.dp
    spec = METHODS[dp.method]
    if dp.sampler not in spec.samplers:
        raise ConfigError(
            f"dp.sampler={dp.sampler} cannot be accounted with dp.method={dp.method}; "
            f"choose dp.sampler={' or '.join(spec.samplers)}"
        )
    if (spec.noise == "bandmf" or dp.sampler == "cyclic_poisson") and not dp.bands >= 1:
        raise ConfigError(f"dp.bands={dp.bands} is not allowed; choose an integer >= 1")
    if spec.noise == "blt" and not 1 <= dp.buffers <= 10:
        raise ConfigError(f"dp.buffers={dp.buffers} is not allowed; choose an integer in [1, 10]")
    if spec.noise == "bandmf" and cfg.runner.steps is not None and dp.bands > cfg.runner.steps:
        raise ConfigError(
            f"dp.bands={dp.bands} is more than the run's runner.steps={cfg.runner.steps}; "
            f"choose dp.bands in [1, {cfg.runner.steps}]"
        )


def resolve_delta(cfg: DictConfig, num_examples: int) -> float | None:
    """δ for this run; warns when δ >= 1/n (a mechanism could then publish one record outright)."""
    dp = cfg.dp
    if dp.method == "none":
        return None
    delta = dp.delta if dp.delta is not None else num_examples ** (-dp.delta_exponent)
    if delta >= 1.0 / num_examples:
        log.warning(
            "dp.delta=%.3g >= 1/n = %.3g (n=%d training examples): the usual choice is below 1/n, "
            "e.g. dp.delta_exponent=1.1",
            delta,
            1.0 / num_examples,
            num_examples,
        )
    acc = cfg.get("accountant")
    if acc is not None and acc.name == "prv" and acc.delta_error is not None and not acc.delta_error < delta:
        raise ConfigError(
            f"accountant.delta_error={acc.delta_error} is not allowed; choose null (δ/1000) "
            f"or a number in (0, {delta:.3g}) (δ = n^-dp.delta_exponent with n={num_examples})"
        )
    return float(delta)


def validate_batch_size(cfg: DictConfig, num_examples: int, unit: str = "examples") -> None:
    """The expected logical batch must fit in the training set (also for planning commands)."""
    if cfg.runner.batch_size > num_examples:
        raise ConfigError(
            f"runner.batch_size={cfg.runner.batch_size} is larger than the training set "
            f"({num_examples} {unit} of {cfg.dataset.display_name}); choose at most {num_examples}"
        )


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
    "adaptive_clip": "dp.adaptive_clip.*",
    "unit": "dp.unit, dp.max_examples_per_user, dataset.user_key",
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
    # Adaptive quantile clipping (None: C fixed at clip_norm); σ is then the composed multiplier.
    adaptive: adaptive_clip_lib.AdaptiveClip | None = None
    # dp.unit=user: the users (dpbench.privacy.units); the sampler, σ and δ then count users.
    units: units_lib.UserUnits | None = None

    @property
    def unit(self) -> str:
        return "example" if self.units is None else "user"

    @property
    def unit_size(self) -> int:
        """Rows per privacy unit in a batch: 1, or dp.max_examples_per_user."""
        return 1 if self.units is None else self.units.max_examples_per_user

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def expected_batch_size(self) -> float:
        """What the noisy sum is divided by: the sampler's mean batch size (data-independent)."""
        sampler = self.sampler
        return float(getattr(sampler, "expected_batch_size", None) or sampler.batch_size)

    @property
    def gradient_noise_variance(self) -> float:
        """The variance i.i.d. noise adds to each coordinate of the averaged gradient, (σC/B)²
        (0 when non-private); DP-AdamBC subtracts it."""
        if not self.private:
            return 0.0
        return (self.noise_multiplier * self.clip_norm / self.expected_batch_size) ** 2

    def noise_std(self) -> dict[str, float]:
        """The noise std per coordinate of the averaged gradient, per step and in the running sum of
        updates (``dpbench.privacy.noise.noise_std``)."""
        std_on_sum = self.gradient_noise_multiplier * self.clip_norm
        return noise_lib.noise_std(self.strategy, self.steps, std_on_sum, self.expected_batch_size)

    def dp_event(self, steps: int | None = None):
        """The accounting event of the first ``steps`` logical steps (default: the whole run)."""
        return self.sampler.dp_event(self.noise_multiplier, self.steps if steps is None else steps)

    def noise_transform(self, key, chunk_elements: int | None = None):
        """The noise transform of this run (``dpbench.privacy.noise``), keyed by the privacy randomness;
        ``chunk_elements``: draw large unsharded leaves in chunks (the same noise, less memory)."""
        if not self.private:
            return None
        if self.adaptive is not None:  # per unit of C: the trainer scales it by each step's C
            return self.strategy.transform(self.gradient_noise_multiplier, key, chunk_elements)
        return self.strategy.transform(self.noise_multiplier * self.clip_norm, key, chunk_elements)

    @property
    def gradient_noise_multiplier(self) -> float | None:
        """The multiplier of the gradient noise: σ, or with adaptive clipping the larger z_Δ that
        composes with the count's noise to σ (Andrew et al. 2021, Theorem 1)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return adaptive_clip_lib.gradient_noise_multiplier(
            self.noise_multiplier, self.adaptive.count_noise_multiplier
        )

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
            **({"adaptive_clip": self.adaptive.describe(self.noise_multiplier)} if self.adaptive else {}),
            **({"unit": self.units.describe()} if self.units is not None else {}),
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
            raise ConfigError(
                f"dp.bands={cfg.dp.bands} groups of runner.batch_size={cfg.runner.batch_size} do not fit in "
                f"n={num_examples} examples (dp.sampler=cyclic_poisson); choose dp.bands in [1, {most}]"
            ) from None
        raise ConfigError(str(error)) from None


def _strategy(cfg: DictConfig, sampler, steps: int) -> noise_lib.Strategy:
    """The noise strategy ``dp.method`` names, fitted to this run (``dp.optimize_strategy``)."""
    kind = METHODS[cfg.dp.method].noise
    optimize = bool(cfg.dp.get("optimize_strategy", True))
    if kind == "bandmf":
        if cfg.dp.bands > steps:
            raise ConfigError(
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


def plan_mechanism(cfg: DictConfig, num_examples: int, units: units_lib.UserUnits | None = None) -> Mechanism:
    """Sampler, logical steps, noise strategy and σ (calibrated from ε, or given) for a training set
    of ``num_examples``, or of ``units`` (``dp.unit=user``: everything then counts users).

    Raises ``ConfigError`` naming the setting when the batch is larger than the data, when the
    steps/epochs setting gives no logical step, when the strategy does not fit the run, or when the
    accountant cannot account the sampler.
    """
    if units is not None:
        num_examples = units.num_users
    validate_batch_size(cfg, num_examples, "examples" if units is None else "users")
    # The sampler's seed is bound later, from the privacy randomness (Mechanism.bind).
    sampler = _sampler(cfg, num_examples)
    if cfg.runner.steps is not None:
        steps = int(cfg.runner.steps)
    else:
        steps = sampler.steps_for_epochs(cfg.runner.epochs)
        if steps < 1:
            one_step = 1 / sampler.steps_for_epochs(1.0)
            raise ConfigError(
                f"runner.epochs={cfg.runner.epochs} gives 0 logical steps (n={num_examples}, "
                f"runner.batch_size={cfg.runner.batch_size}); choose runner.epochs >= {one_step:.3g} "
                "or set runner.steps (an integer >= 1) with runner.epochs=null"
            )
    if cfg.dp.method == "none":
        return Mechanism(sampler, steps, None, None, method="none", units=units)
    strategy = _strategy(cfg, sampler, steps)
    try:
        accounting.check_supported(sampler, cfg.accountant)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    delta = resolve_delta(cfg, num_examples)
    if cfg.dp.noise_multiplier is not None:
        sigma = float(cfg.dp.noise_multiplier)
    else:
        sigma = accounting.calibrate_noise_multiplier(sampler, steps, cfg.dp.epsilon, delta, cfg.accountant)
    if not math.isfinite(sigma):
        raise ConfigError(
            f"σ={sigma} is not finite; dp.epsilon and dp.noise_multiplier must be finite numbers > 0"
        )
    mechanism = Mechanism(
        sampler,
        steps,
        sigma,
        delta,
        method=cfg.dp.method,
        clip_norm=float(cfg.dp.clip_norm),
        accountant=_accountant_description(cfg),
        randomness=cfg.dp.randomness,
        strategy=strategy,
        units=units,
    )
    adaptive = cfg.dp.get("adaptive_clip")
    if adaptive is not None and adaptive.target_quantile is not None:
        mechanism.adaptive = adaptive_clip_lib.AdaptiveClip.from_config(
            adaptive, mechanism.clip_norm, mechanism.expected_batch_size, sigma
        )
    return mechanism
