"""Privacy accounting with dp_accounting, driven by the sampler's own DpEvent (host-side).

The sampler says what mechanism ran (``sampler.dp_event(σ, steps)``, ``sampler.neighbouring``);
this module only chooses the accountant, so sampling and accounting cannot disagree.

>>> from dpbench.privacy.batch_selection import PoissonSampler
>>> sampler = PoissonSampler(num_examples=60_000, expected_batch_size=256, seed=0)
>>> round(compute_epsilon(sampler, 1.12, 14_062, 1e-5, AccountantConfig(name="rdp")), 3)
2.519
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from typing import TYPE_CHECKING

import dp_accounting
from dp_accounting import pld, rdp

from dpbench.errors import ConfigError
from dpbench.privacy import prv
from dpbench.schema import schema

if TYPE_CHECKING:
    from dpbench.privacy.batch_selection import Sampler

ACCOUNTANT_NAMES = ("pld", "rdp", "prv")
NEIGHBOUR_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class _OnceRdpConvergenceWarning(logging.Filter):
    """Let dp_accounting's "_compute_log_a_frac failed to converge" warning through once per process.

    At small σ its series for some fractional orders (α < 1.5) does not converge; it then gives that
    order an infinite RDP, so ε, the minimum over the remaining orders, is still a valid upper bound.
    It warns at every ε computation (each calibration probe, each logged step), dozens per run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("_compute_log_a_frac failed to converge"):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.getMessage()} (shown once; ε over the other orders stays an upper bound)"
        record.args = ()
        return True


_ABSL_LOGGER = logging.getLogger("absl")
if not any(isinstance(f, _OnceRdpConvergenceWarning) for f in _ABSL_LOGGER.filters):
    _ABSL_LOGGER.addFilter(_OnceRdpConvergenceWarning())

# Calibration tolerance on σ (absolute). 1e-4 keeps ε(σ*) within 1% of the target for σ >~ 0.05.
_CALIBRATION_TOL = 1e-4


@schema("accountant")
@dataclasses.dataclass
class AccountantConfig:
    """How ε is computed from the mechanism: PLD, RDP or PRV, and their precision."""

    name: str = "pld"  # "pld" (tight, slower), "rdp" (looser, fast) or "prv" (tight, reports an upper bound)
    value_discretization_interval: float = 1e-4  # PLD only: smaller is tighter and slower
    orders: list[float] | None = None  # RDP only: None -> dp_accounting's default orders
    # PRV only (dpbench.privacy.prv): ε is reported as PRV's upper bound, at most about eps_error above
    # its estimate; delta_error is the error allowed in δ, None -> δ/1000 (decided where δ is known).
    eps_error: float = 0.01
    delta_error: float | None = None


def check_settings(acc: AccountantConfig, dp) -> None:
    """The ``accountant.*`` settings (PRV's error bounds against ``dp.delta``), before anything loads."""
    if acc.name != "prv":
        return
    if not acc.eps_error > 0:
        raise ConfigError(
            f"accountant.eps_error={acc.eps_error} is not allowed; choose a number > 0 (e.g. 0.01)"
        )
    bound = dp.delta if dp.method != "none" and dp.delta is not None else 1
    if acc.delta_error is not None and not 0 < acc.delta_error < bound:
        raise ConfigError(
            f"accountant.delta_error={acc.delta_error} is not allowed; choose null (δ/1000) "
            f"or a number in (0, {'dp.delta=' if bound != 1 else ''}{bound:g})"
        )


def make_accountant(cfg: AccountantConfig, neighbouring: str) -> dp_accounting.PrivacyAccountant:
    """A fresh, empty accountant for ``cfg`` and a neighbouring relation name.

    >>> type(make_accountant(AccountantConfig(name="rdp"), "replace_one")).__name__
    'RdpAccountant'
    >>> make_accountant(AccountantConfig(name="moments"), "add_remove")
    Traceback (most recent call last):
    ...
    ValueError: accountant.name must be one of ('pld', 'rdp', 'prv'), got 'moments'
    """
    if neighbouring not in NEIGHBOUR_RELATIONS:
        raise ValueError(
            f"neighbouring relation must be one of {tuple(NEIGHBOUR_RELATIONS)}, got {neighbouring!r}"
        )
    relation = NEIGHBOUR_RELATIONS[neighbouring]
    if cfg.name == "pld":
        if cfg.value_discretization_interval <= 0:
            raise ValueError(
                "accountant.value_discretization_interval must be > 0, "
                f"got {cfg.value_discretization_interval}"
            )
        return pld.PLDAccountant(
            neighboring_relation=relation,
            value_discretization_interval=cfg.value_discretization_interval,
        )
    if cfg.name == "rdp":
        orders = None if cfg.orders is None else [float(order) for order in cfg.orders]
        if orders is not None and (not orders or min(orders) <= 1):
            raise ValueError(f"accountant.orders must be a non-empty list of orders > 1, got {cfg.orders}")
        return rdp.RdpAccountant(orders=orders, neighboring_relation=relation)
    if cfg.name == "prv":
        return prv.PrvAccountant(relation, eps_error=cfg.eps_error, delta_error=cfg.delta_error)
    raise ValueError(f"accountant.name must be one of {ACCOUNTANT_NAMES}, got {cfg.name!r}")


def check_supported(sampler: Sampler, cfg: AccountantConfig) -> None:
    """Raise ValueError if ``cfg``'s accountant cannot account ``sampler``'s mechanism (no silent fallback).

    Besides ``accountant.supports(event)``, RDP is refused for replace-one samplers: dp_accounting's
    ``RdpAccountant`` reads a Gaussian's noise multiplier as relative to the replace-one sensitivity
    (2C), while ``GaussianDpEvent`` defines it relative to the per-example bound C (as
    ``PLDAccountant`` does), so RDP would under-report ε (google/differential-privacy issue #378).

    >>> from dpbench.privacy.batch_selection import PoissonSampler, ShuffleSampler
    >>> check_supported(PoissonSampler(100, 10, seed=0), AccountantConfig(name="rdp"))  # supported: no error
    >>> check_supported(ShuffleSampler(100, 10, seed=0), AccountantConfig(name="rdp"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: accountant 'rdp' cannot account sampler 'shuffle' (replace_one neighbours): ...
    """
    event = sampler.dp_event(1.0, 1)
    accountant = make_accountant(cfg, sampler.neighbouring)
    if cfg.name == "rdp" and sampler.neighbouring == "replace_one":
        reason = (
            "dp_accounting's RdpAccountant treats the Gaussian noise multiplier as relative to the "
            "replace-one sensitivity 2C, not the clip norm C, and would under-report epsilon "
            "(google/differential-privacy#378); use accountant=pld"
        )
    elif isinstance(accountant, prv.PrvAccountant) and not accountant.supports(event):
        reason = accountant.unsupported_reason(event)
    elif not accountant.supports(event):
        reason = (
            f"dp_accounting does not support {event} with this accountant; use another accountant or sampler"
        )
    else:
        return
    raise ValueError(
        f"accountant {cfg.name!r} cannot account sampler {sampler.name!r} "
        f"({sampler.neighbouring} neighbours): {reason}. Allowed accountants: {ACCOUNTANT_NAMES}"
    )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def compute_epsilon(
    sampler: Sampler, noise_multiplier: float, steps: int, delta: float, cfg: AccountantConfig
) -> float:
    """ε after ``steps`` logical steps with noise std ``noise_multiplier * clip_norm`` on the clipped sum."""
    _check_delta(delta)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps == 0:
        return 0.0
    check_supported(sampler, cfg)
    accountant = make_accountant(cfg, sampler.neighbouring)
    accountant.compose(sampler.dp_event(noise_multiplier, steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    sampler: Sampler, steps: int, target_epsilon: float, delta: float, cfg: AccountantConfig
) -> float:
    """Smallest σ (within 1e-4) with ε(σ) <= ``target_epsilon`` after ``steps`` logical steps."""
    _check_delta(delta)
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0 to calibrate noise, got {steps}")
    check_supported(sampler, cfg)
    sigma = dp_accounting.calibrate_dp_mechanism(
        make_fresh_accountant=lambda: make_accountant(cfg, sampler.neighbouring),
        make_event_from_param=lambda noise_multiplier: sampler.dp_event(noise_multiplier, steps),
        target_epsilon=target_epsilon,
        target_delta=delta,
        tol=_CALIBRATION_TOL,
    )
    if sigma is None:
        raise RuntimeError(
            f"noise calibration did not converge for ε={target_epsilon}, δ={delta}, {steps} steps"
        )
    return float(sigma)


class EpsilonTracker:
    """ε spent so far, and a guard against training past the budgeted number of logical steps.

    PLD accounting takes about a second, so call ``epsilon_at`` at evaluation time, not every step.

    >>> from dpbench.privacy.batch_selection import PoissonSampler
    >>> sampler = PoissonSampler(num_examples=60_000, expected_batch_size=256, seed=0)
    >>> tracker = EpsilonTracker(sampler, 1.1, 1e-5, AccountantConfig(name="rdp"), budgeted_steps=100)
    >>> tracker.epsilon_at(0)
    0.0
    >>> tracker.check_step(101)
    Traceback (most recent call last):
    ...
    RuntimeError: logical step 101 exceeds the 100 logical steps the privacy budget was calibrated for
    """

    def __init__(
        self,
        sampler: Sampler,
        noise_multiplier: float,
        delta: float,
        cfg: AccountantConfig,
        budgeted_steps: int,
    ):
        check_supported(sampler, cfg)
        _check_delta(delta)
        self.sampler = sampler
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.cfg = cfg
        self.budgeted_steps = budgeted_steps
        self._cache: dict[int, float] = {}

    def epsilon_at(self, step: int) -> float:
        """ε after ``step`` logical steps have been taken."""
        if step not in self._cache:
            self._cache[step] = compute_epsilon(
                self.sampler, self.noise_multiplier, step, self.delta, self.cfg
            )
        return self._cache[step]

    def check_step(self, step: int) -> None:
        """Raise before a logical step numbered past the budget (steps are counted from 1)."""
        if step > self.budgeted_steps:
            raise RuntimeError(
                f"logical step {step} exceeds the {self.budgeted_steps} logical steps "
                "the privacy budget was calibrated for"
            )


def privacy_summary(
    sampler: Sampler,
    noise_multiplier: float,
    steps: int,
    delta: float,
    clip_norm: float,
    cfg: AccountantConfig,
    epsilon: float,
) -> dict:
    """JSON-able description of the guarantee, enough for a reviewer to recompute ε by hand.

    For PRV it also records the interval the true ε lies in (``eps_lower``, ``eps_estimate``,
    ``eps_upper``, recomputed here) and the δ error used; the reported ε is ``eps_upper``.
    """
    versions = {"dp_accounting_version": importlib.metadata.version("dp-accounting")}
    if cfg.name == "pld":
        accountant_params = {"value_discretization_interval": cfg.value_discretization_interval}
    elif cfg.name == "prv":
        accountant = make_accountant(cfg, sampler.neighbouring)
        if steps > 0:
            accountant.compose(sampler.dp_event(noise_multiplier, steps))
        accountant.get_epsilon(delta)
        bounds = accountant.last_epsilon_bounds
        accountant_params = {
            "eps_error": cfg.eps_error,
            "delta_error": accountant.last_delta_error,
            "delta_error_setting": "delta/1000 (accountant.delta_error=null)"
            if cfg.delta_error is None
            else cfg.delta_error,
            "eps_lower": bounds.lower,
            "eps_estimate": bounds.estimate,
            "eps_upper": bounds.upper,
            "reported_epsilon": "eps_upper",
            "method": accountant.last_method,
        }
        versions["prv_accountant_version"] = importlib.metadata.version("prv-accountant")
    else:
        accountant_params = {"orders": "dp_accounting default" if cfg.orders is None else list(cfg.orders)}
    return {
        "mechanism": {
            "sampler": sampler.describe(),
            "sampling_rate": sampler.sampling_rate,
            "logical_steps": steps,
            "clip_norm": clip_norm,
            "noise_multiplier": noise_multiplier,
            "noise_std_on_sum": noise_multiplier * clip_norm,
            "dp_event": repr(sampler.dp_event(noise_multiplier, steps)),
        },
        "accountant": {"name": cfg.name, **accountant_params},
        "neighbouring": sampler.neighbouring,
        "delta": delta,
        "epsilon": epsilon,
        **versions,
    }
