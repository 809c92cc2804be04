"""The PRV accountant (Gopi, Lee & Wutschitz 2021, "Numerical Composition of Differential Privacy").

``PrvAccountant`` wraps Microsoft's ``prv_accountant`` package (Opacus's default accountant) in
dp_accounting's ``PrivacyAccountant`` interface, so it composes the same ``DpEvent`` the sampler
describes (``sampler.dp_event``) and plugs into ``dp_accounting.calibrate_dp_mechanism``.

PRV discretises each privacy loss random variable on a grid chosen from the requested errors and
returns three numbers: ``eps_lower <= eps_estimate <= eps_upper``, where the true ε at δ lies in
``[eps_lower, eps_upper]`` and ``eps_upper - eps_estimate`` is about ``eps_error``. ``get_epsilon``
returns **eps_upper**: a DP harness must never under-report. ``delta_error`` is the error allowed in
δ; ``None`` means ``δ / 1000`` for the δ asked (Opacus's and prv_accountant's own choice).

Events it translates (all other events: ``supports`` is False, with a reason):

* ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``, add/remove-one neighbours:
  ``PoissonSubsampledGaussianMechanism(q, σ)``. q = 1 is a plain Gaussian, q = 0 a no-op.
* ``GaussianDpEvent(σ)``: ``GaussianMechanism(σ, l2_sensitivity=1)`` under add/remove-one, and
  ``l2_sensitivity=2`` under replace-one (replacing one example moves the sum by at most 2C, as
  dp_accounting's PLD accountant assumes; tests/privacy/test_prv.py checks the two agree).
* ``SelfComposedDpEvent``, ``ComposedDpEvent`` of these, ``NoOpDpEvent``, and ``NonPrivateDpEvent``
  (or σ = 0), which gives ε = inf.

Refused: a Poisson-subsampled Gaussian under replace-one (prv_accountant's subsampled Gaussian is
the add/remove-one mechanism only; it would under-report), and the replace-special relation.

When the grid would exceed ``max_domain_points`` (ε in the hundreds, e.g. the tiny σ a calibration
probes) or prv_accountant fails numerically, the bound falls back to the Rényi DP bound of the same
random variables (prv_accountant's ``RDP``, also an upper bound), with a warning, and
``last_method`` says so.

>>> import dp_accounting
>>> event = dp_accounting.SelfComposedDpEvent(
...     dp_accounting.PoissonSampledDpEvent(240 / 60_000, dp_accounting.GaussianDpEvent(1.3)), 3_750)
>>> accountant = PrvAccountant(eps_error=0.01)
>>> eps = accountant.compose(event).get_epsilon(1e-5)  # Opacus MNIST: PLD gives 0.834
>>> bounds = accountant.last_epsilon_bounds
>>> eps == bounds.upper, round(bounds.estimate, 2), accountant.last_delta_error
(True, 0.83, 1e-08)
>>> bounds.lower <= 0.834 <= bounds.upper
True
>>> PrvAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE).supports(event)
False
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import dp_accounting
import numpy as np
import prv_accountant
from dp_accounting import dp_event
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.other_accountants import RDP

log = logging.getLogger(__name__)

NeighborRel = dp_accounting.NeighboringRelation
CompositionErrorDetails = dp_accounting.PrivacyAccountant.CompositionErrorDetails

# Largest PRV grid computed (about 4 µs per point on a CPU core: 2**22 points take ~20 s). Beyond it
# ε is in the hundreds; the RDP bound is then used instead (see the module docstring).
MAX_DOMAIN_POINTS = 2**22
# delta_error for get_delta when none is set (there is no δ to take 1/1000 of).
GET_DELTA_DEFAULT_ERROR = 1e-10


class EpsilonBounds(NamedTuple):
    """PRV's ε interval at one δ: the true ε lies in [lower, upper]; ``upper`` is what is reported."""

    lower: float
    estimate: float
    upper: float


def default_delta_error(delta: float) -> float:
    """The δ error used when ``delta_error`` is None: δ / 1000."""
    return delta / 1000


class PrvAccountant(dp_accounting.PrivacyAccountant):
    """dp_accounting ``PrivacyAccountant`` backed by ``prv_accountant.PRVAccountant`` (see module doc)."""

    def __init__(
        self,
        neighboring_relation: NeighborRel = NeighborRel.ADD_OR_REMOVE_ONE,
        eps_error: float = 0.01,
        delta_error: float | None = None,
        max_domain_points: int = MAX_DOMAIN_POINTS,
    ):
        if not (math.isfinite(eps_error) and eps_error > 0):
            raise ValueError(f"accountant.eps_error must be a finite number > 0, got {eps_error}")
        if delta_error is not None and not 0 < delta_error < 1:
            raise ValueError(f"accountant.delta_error must be null or in (0, 1), got {delta_error}")
        super().__init__(neighboring_relation)
        self.eps_error = float(eps_error)
        self.delta_error = None if delta_error is None else float(delta_error)
        self.max_domain_points = max_domain_points
        # (kind, parameter, σ) -> number of compositions; kind "subsampled" (parameter q) or
        # "gaussian" (parameter: l2 sensitivity in units of C).
        self._counts: dict[tuple[str, float, float], int] = {}
        self._non_private = False
        self.last_epsilon_bounds: EpsilonBounds | None = None
        self.last_delta_bounds: tuple[float, float, float] | None = None
        self.last_delta_error: float | None = None
        self.last_method: str | None = None

    # --- dp_accounting interface -------------------------------------------------------------

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> CompositionErrorDetails | None:
        relation = self.neighboring_relation
        if relation not in (NeighborRel.ADD_OR_REMOVE_ONE, NeighborRel.REPLACE_ONE):
            return CompositionErrorDetails(
                invalid_event=event,
                error_message=f"the PRV adapter supports add/remove-one and replace-one only, not {relation}",
            )
        if isinstance(event, dp_event.NoOpDpEvent):
            return None
        if isinstance(event, dp_event.NonPrivateDpEvent):
            if do_compose:
                self._non_private = True
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_event.ComposedDpEvent):
            for sub_event in event.events:
                error = self._maybe_compose(sub_event, count, do_compose)
                if error is not None:
                    return error
            return None
        if isinstance(event, dp_event.GaussianDpEvent):
            if do_compose:
                self._add_gaussian(event.noise_multiplier, count)
            return None
        if isinstance(event, dp_event.PoissonSampledDpEvent):
            if not isinstance(event.event, dp_event.GaussianDpEvent):
                return CompositionErrorDetails(
                    invalid_event=event,
                    error_message=(
                        "prv_accountant has a Poisson-subsampled Gaussian only; "
                        f"found a Poisson-subsampled {type(event.event).__name__}"
                    ),
                )
            q, sigma = float(event.sampling_probability), float(event.event.noise_multiplier)
            if q == 0:
                return None
            if q == 1:
                if do_compose:
                    self._add_gaussian(sigma, count)
                return None
            if relation != NeighborRel.ADD_OR_REMOVE_ONE:
                return CompositionErrorDetails(
                    invalid_event=event,
                    error_message=(
                        "prv_accountant's Poisson-subsampled Gaussian is the add/remove-one mechanism "
                        "and would under-report epsilon for replace-one neighbours; use accountant=pld"
                    ),
                )
            if do_compose:
                if sigma == 0:
                    self._non_private = True
                elif count > 0:
                    self._add(("subsampled", q, sigma), count)
            return None
        return CompositionErrorDetails(
            invalid_event=event,
            error_message=(
                f"the PRV adapter cannot account {type(event).__name__}: it translates (self-)composed "
                "Gaussian and Poisson-subsampled Gaussian events only"
            ),
        )

    def get_epsilon(self, target_delta: float) -> float:
        """ε upper bound at ``target_delta``; the full interval is left in ``last_epsilon_bounds``."""
        if not 0 < target_delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {target_delta}")
        delta_error = self.delta_error if self.delta_error is not None else default_delta_error(target_delta)
        if delta_error >= target_delta:
            raise ValueError(
                f"accountant.delta_error={delta_error:g} must be smaller than δ={target_delta:g}"
            )
        self.last_delta_error = delta_error
        if self._non_private:
            self.last_method = "non-private event"
            self.last_epsilon_bounds = EpsilonBounds(math.inf, math.inf, math.inf)
            return math.inf
        if not self._counts:
            self.last_method = "no event"
            self.last_epsilon_bounds = EpsilonBounds(0.0, 0.0, 0.0)
            return 0.0
        prvs, counts = self._prvs()
        reason = self._too_large(prvs, counts, delta_error)
        bounds = None
        if reason is None:
            try:
                accountant = prv_accountant.PRVAccountant(
                    prvs=prvs, max_self_compositions=counts, eps_error=self.eps_error, delta_error=delta_error
                )
                bounds = accountant.compute_epsilon(delta=target_delta, num_self_compositions=counts)
            except (ArithmeticError, RuntimeError, ValueError) as error:
                reason = f"prv_accountant failed ({type(error).__name__}: {error})"
        if bounds is None:
            log.warning("PRV accountant: %s; reporting the RDP upper bound of the same mechanism", reason)
            _, rdp_epsilon, _ = RDP(prvs=prvs).compute_epsilon(
                delta=target_delta, num_self_compositions=counts
            )
            bounds = (0.0, float(rdp_epsilon), float(rdp_epsilon))
            self.last_method = f"rdp (fallback: {reason})"
        else:
            self.last_method = "prv"
        lower, estimate, upper = (max(0.0, float(value)) for value in bounds)
        self.last_epsilon_bounds = EpsilonBounds(lower, estimate, upper)
        return upper

    def get_delta(self, target_epsilon: float) -> float:
        """δ upper bound at ``target_epsilon`` (delta_error None: ``GET_DELTA_DEFAULT_ERROR``)."""
        if self._non_private:
            self.last_delta_bounds = (1.0, 1.0, 1.0)
            return 1.0
        if not self._counts:
            self.last_delta_bounds = (0.0, 0.0, 0.0)
            return 0.0
        delta_error = self.delta_error if self.delta_error is not None else GET_DELTA_DEFAULT_ERROR
        prvs, counts = self._prvs()
        reason = self._too_large(prvs, counts, delta_error)
        if reason is not None:
            raise ValueError(f"PRV accountant cannot compute delta here: {reason}")
        accountant = prv_accountant.PRVAccountant(
            prvs=prvs, max_self_compositions=counts, eps_error=self.eps_error, delta_error=delta_error
        )
        bounds = tuple(min(1.0, max(0.0, float(d))) for d in accountant.compute_delta(target_epsilon, counts))
        self.last_delta_error = delta_error
        self.last_delta_bounds = bounds
        return bounds[2]

    def unsupported_reason(self, event: dp_event.DpEvent) -> str | None:
        """One line saying why ``event`` cannot be accounted (None when ``supports(event)``)."""
        error = self._maybe_compose(event, 1, False)
        return None if error is None else error.error_message

    # --- helpers ------------------------------------------------------------------------------

    def _add(self, key: tuple[str, float, float], count: int) -> None:
        self._counts[key] = self._counts.get(key, 0) + int(count)

    def _add_gaussian(self, sigma: float, count: int) -> None:
        if sigma == 0:
            self._non_private = True
        elif count > 0:
            sensitivity = 2.0 if self.neighboring_relation == NeighborRel.REPLACE_ONE else 1.0
            self._add(("gaussian", sensitivity, float(sigma)), count)

    def _prvs(self) -> tuple[list, list[int]]:
        prvs, counts = [], []
        for (kind, parameter, sigma), count in sorted(self._counts.items()):
            if kind == "subsampled":
                prv = prv_accountant.PoissonSubsampledGaussianMechanism(
                    sampling_probability=parameter, noise_multiplier=sigma
                )
            else:
                prv = prv_accountant.GaussianMechanism(noise_multiplier=sigma, l2_sensitivity=parameter)
            prvs.append(prv)
            counts.append(count)
        return prvs, counts

    def _too_large(self, prvs: list, counts: list[int], delta_error: float) -> str | None:
        """Why the PRV grid is not computed (None: it is), by prv_accountant's own sizing rule."""
        try:
            half_width = compute_safe_domain_size(
                prvs, counts, eps_error=self.eps_error, delta_error=delta_error
            )
        except (ArithmeticError, ValueError) as error:
            return f"prv_accountant's domain sizing failed ({type(error).__name__}: {error})"
        mesh = self.eps_error / np.sqrt(sum(counts) / 2 * np.log(12 / delta_error))
        points = 2 * half_width / mesh
        if not points <= self.max_domain_points:
            return (
                f"its grid would have {points:.3g} points (> max_domain_points={self.max_domain_points}; "
                f"the RDP ε at δ_error/4 is {half_width - 3:.4g})"
            )
        return None
