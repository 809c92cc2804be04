"""Hyperparameter tuning inside the privacy budget (Papernot & Steinke, ICLR 2022), host-side NumPy.

Run a DP training procedure Q a *random* number of times K, each time with hyperparameters drawn
at random from a grid, and release only the best run (its model and its private score). If K is
drawn from a Poisson or a truncated negative binomial distribution and kept secret, the release is
Rényi-DP with a bound that depends only on Q's RDP curve and the distribution of K, not on how many
runs happened (Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy",
arXiv:2110.03620):

- **Theorem 2** (K ~ truncated negative binomial D_{η,γ}, η > -1, 0 < γ < 1): if Q is (λ, ε)-RDP and
  (λ̂, ε̂)-RDP, the best of K runs is (λ, ε')-RDP with
  ε' = ε + (1+η)(1-1/λ̂)ε̂ + (1+η)log(1/γ)/λ̂ + log(E[K])/(λ-1), minimised over λ̂.
  η = 1 is the geometric distribution (Liu & Talwar 2019), η = 0 the logarithmic one.
- **Theorem 6** (K ~ Poisson(μ)): if Q is (λ, ε)-RDP and (ε̂, δ̂)-DP with e^ε̂ <= 1 + 1/(λ-1), the
  best of K runs (nothing when K = 0) is (λ, ε')-RDP with ε' = ε + μδ̂ + log(μ)/(λ-1); δ̂ is read
  off Q's own RDP curve at the largest allowed ε̂.

RDP is non-decreasing in the order, so each bound is then lowered to the smallest bound at any
order at or above it. ``epsilon_from_rdp`` converts to (ε, δ) with dp-accounting's conversion
(Canonne, Kamath & Steinke 2020). dp-accounting's own ``RepeatAndSelectDpEvent`` (written by one of
the paper's authors, for η >= 0 and parameterised by E[K]) is the cross-check in
``tests/privacy/test_tuning.py``; this module also covers η in (-1, 0) and is parameterised as the
paper is.

Per-trial RDP comes from the trial's own accounting event (``Mechanism.dp_event()``), plus, when
the score is a noisy count, one Gaussian of sensitivity 1 (``trial_rdp``).

>>> count = TrialCount("truncated_negative_binomial", eta=1.0, gamma=0.25)   # geometric, E[K] = 4
>>> round(count.mean, 6)
4.0
>>> orders = np.array([2.0, 8.0, 32.0, 1e6])
>>> pure = np.full(4, 0.1)   # a 0.1-DP trial: RDP 0.1 at every order
>>> [round(float(x), 3) for x in tuned_rdp(orders, pure, count)]   # -> (2 + η) ε = 0.3 as λ grows
[0.3, 0.3, 0.3, 0.3]
>>> poisson = tuned_rdp(orders, pure, TrialCount("poisson", mu=4.0))   # at λ = 8: ε̂ = log(8/7) > 0.1, δ̂ = 0
>>> round(float(poisson[1]), 4), round(0.1 + math.log(4) / 7, 4)
(0.298, 0.298)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpbench.errors import ConfigError
from dpbench.schema import schema

DISTRIBUTIONS = ("poisson", "truncated_negative_binomial")
# Names a user may reach for that mean a fixed number of trials: refused with the reason.
DETERMINISTIC = ("fixed", "grid", "constant", "deterministic", "all", "none")
SCORES = ("noisy_validation", "eval")
# Orders (> 1) at which the per-trial RDP is evaluated: dp-accounting's defaults, a few orders close
# to 1 and larger ones (λ̂ in Theorem 2 can be large when γ is small, λ in Theorem 6 close to 1).
ORDERS = tuple(
    sorted(
        {1.01, 1.02, 1.05}
        | {1 + x / 10.0 for x in range(1, 100)}
        | set(range(11, 64))
        | {80, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096}
    )
)


@schema("tune")
@dataclasses.dataclass
class TuneConfig:
    """Tuning inside the privacy budget: K random trials from the sweep's grid, the best released."""

    # poisson | truncated_negative_binomial: the law of the number of trials K (a fixed K is refused:
    # the bound needs K random and secret). Poisson: E[K] = mu, and K = 0 releases nothing.
    distribution: str = "poisson"
    mu: float = 4.0  # Poisson: the mean number of trials (> 0)
    # Truncated negative binomial D_{η,γ} (K >= 1): eta > -1 (1: geometric, 0: logarithmic), gamma in
    # (0, 1); E[K] = η(1-γ)/(γ(1-γ^η)), e.g. eta=1, gamma=0.25 gives E[K] = 4.
    eta: float = 1.0
    gamma: float = 0.25
    epsilon: float = 1.0  # the TOTAL ε of the released trial, tuning included; each trial's σ is set for it
    # How each trial is scored: noisy_validation = the evaluation split's correct count (or ROUGE-L
    # sum) plus N(0, score_noise²), accounted as one more Gaussian per trial (the split held out of
    # the training data is private); eval = the exact evaluation metric, free only when the
    # evaluation split is public (the test split: needs dataset.validation_examples=null).
    score: str = "noisy_validation"
    score_noise: float = 20.0  # noisy_validation: std of the noise on the count (sensitivity 1)


def check_settings(tune: TuneConfig, dataset=None) -> None:
    """The ``tune.*`` settings, before anything loads (``dataset``: the ``dataset`` node, when known).

    >>> check_settings(TuneConfig(distribution="fixed"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dpbench.errors.ConfigError: tune.distribution=fixed is a deterministic number of trials: ...
    """
    if tune.distribution in DETERMINISTIC:
        raise ConfigError(
            f"tune.distribution={tune.distribution} is a deterministic number of trials: the bound of "
            "Papernot & Steinke (2022) needs a random, secret K; choose one of "
            f"{', '.join(DISTRIBUTIONS)} (e.g. tune.distribution=poisson tune.mu=4)"
        )
    if tune.distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"tune.distribution={tune.distribution!r} is not allowed; "
            f"choose one of {', '.join(DISTRIBUTIONS)}"
        )
    if tune.distribution == "poisson" and not (math.isfinite(tune.mu) and tune.mu > 0):
        raise ConfigError(
            f"tune.mu={tune.mu} is not allowed; choose a number > 0 (the mean number of trials)"
        )
    if tune.distribution == "truncated_negative_binomial":
        if not (math.isfinite(tune.eta) and tune.eta > -1):
            raise ConfigError(f"tune.eta={tune.eta} is not allowed; choose a number > -1 (1: geometric)")
        if not 0 < tune.gamma < 1:
            why = " (γ = 1 always runs one trial: a deterministic K)" if tune.gamma == 1 else ""
            raise ConfigError(f"tune.gamma={tune.gamma} is not allowed{why}; choose a number in (0, 1)")
    if not (math.isfinite(tune.epsilon) and tune.epsilon > 0):
        raise ConfigError(f"tune.epsilon={tune.epsilon} is not allowed; choose a number > 0 (the total ε)")
    if tune.score not in SCORES:
        raise ConfigError(f"tune.score={tune.score!r} is not allowed; choose one of {', '.join(SCORES)}")
    if tune.score == "noisy_validation" and not (math.isfinite(tune.score_noise) and tune.score_noise > 0):
        raise ConfigError(f"tune.score_noise={tune.score_noise} is not allowed; choose a number > 0")
    if dataset is None:
        return
    held_out = dataset.get("validation_examples")
    if tune.score == "eval" and held_out:
        raise ConfigError(
            f"tune.score=eval scores on the validation split held out of the training data "
            f"(dataset.validation_examples={held_out}), which is private; choose "
            "tune.score=noisy_validation, or dataset.validation_examples=null (score on the public "
            "test split)"
        )
    if tune.score == "noisy_validation" and not held_out:
        raise ConfigError(
            "tune.score=noisy_validation needs a validation split held out of the training data: set "
            "dataset.validation_examples (e.g. 10000), or tune.score=eval to score on the public test split"
        )


@dataclasses.dataclass(frozen=True)
class TrialCount:
    """The law of K, the number of trials: ``poisson`` (``mu``) or ``truncated_negative_binomial``
    (``eta``, ``gamma``), with its probabilities and a sampler.

    >>> tnb = TrialCount("truncated_negative_binomial", eta=0.5, gamma=0.1)
    >>> k = np.arange(1, 2000)
    >>> round(float(tnb.pmf(k).sum()), 9), round(float((k * tnb.pmf(k)).sum() / tnb.mean), 6)
    (1.0, 1.0)
    """

    distribution: str
    mu: float | None = None
    eta: float | None = None
    gamma: float | None = None

    @classmethod
    def from_config(cls, tune) -> TrialCount:
        if tune.distribution == "poisson":
            return cls("poisson", mu=float(tune.mu))
        return cls("truncated_negative_binomial", eta=float(tune.eta), gamma=float(tune.gamma))

    @property
    def mean(self) -> float:
        """E[K]."""
        if self.distribution == "poisson":
            return float(self.mu)
        return truncated_negative_binomial_mean(self.eta, self.gamma)

    def pmf(self, k) -> np.ndarray:
        """P[K = k] for integers k >= 0."""
        k = np.asarray(k, dtype=np.float64)
        if self.distribution == "poisson":
            from scipy import special

            return np.exp(k * math.log(self.mu) - self.mu - special.gammaln(k + 1))
        return truncated_negative_binomial_pmf(k, self.eta, self.gamma)

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of K from ``rng`` (which must come from the privacy randomness, never a public seed)."""
        if self.distribution == "poisson":
            return int(rng.poisson(self.mu))
        return sample_truncated_negative_binomial(rng, self.eta, self.gamma)

    def describe(self) -> dict:
        params = {"mu": self.mu} if self.distribution == "poisson" else {"eta": self.eta, "gamma": self.gamma}
        return {"distribution": self.distribution, **params, "mean": self.mean}


def truncated_negative_binomial_mean(eta: float, gamma: float) -> float:
    """E[K] for K ~ D_{η,γ}: η(1-γ)/(γ(1-γ^η)), and (1/γ-1)/log(1/γ) at η = 0.

    >>> round(truncated_negative_binomial_mean(1.0, 0.1), 9)   # geometric: 1/γ
    10.0
    """
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))


def truncated_negative_binomial_pmf(k, eta: float, gamma: float) -> np.ndarray:
    """P[K = k] = (1-γ)^k / (γ^-η - 1) · Π_{l<k} (l+η)/(l+1) for k >= 1 (η = 0: the logarithmic law
    (1-γ)^k / (k log(1/γ))); 0 for k < 1."""
    from scipy import special

    k = np.asarray(k, dtype=np.float64)
    safe = np.maximum(k, 1.0)
    if eta == 0:
        log_p = safe * math.log1p(-gamma) - np.log(safe) - math.log(math.log(1 / gamma))
        return np.where(k >= 1, np.exp(log_p), 0.0)
    # Π_{l<k} (l+η)/(l+1) = Γ(k+η) / (Γ(η) Γ(k+1)); Γ(η) < 0 for η in (-1, 0), as is γ^-η - 1.
    log_ratio = special.gammaln(safe + eta) - special.gammaln(safe + 1) - special.gammaln(eta)
    normaliser = math.expm1(-eta * math.log(gamma))
    sign = np.sign(special.gamma(eta)) * np.sign(normaliser)
    log_p = safe * math.log1p(-gamma) + log_ratio - math.log(abs(normaliser))
    return np.where(k >= 1, sign * np.exp(log_p), 0.0)


def sample_truncated_negative_binomial(rng: np.random.Generator, eta: float, gamma: float) -> int:
    """One draw of K ~ D_{η,γ} by inversion: one uniform, then the cumulative probabilities, whose
    ratio P[k+1]/P[k] = (1-γ)(k+η)/(k+1) gives each from the last (every η > -1)."""
    u = rng.random()
    k = 1
    p = float(truncated_negative_binomial_pmf(1, eta, gamma))
    cumulative = p
    while cumulative < u:
        p *= (1 - gamma) * (k + eta) / (k + 1)
        k += 1
        cumulative += p
        if p < 1e-300 and (1 - gamma) * (k + eta) / (k + 1) < 1:  # the rest of the tail rounds to 0
            break
    return k


def _monotone(orders: np.ndarray, rdp: np.ndarray) -> np.ndarray:
    """RDP is non-decreasing in the order: the bound at λ is the least bound at any order >= λ."""
    order = np.argsort(orders)
    lowered = np.minimum.accumulate(rdp[order][::-1])[::-1]
    out = np.empty_like(rdp)
    out[order] = lowered
    return out


def truncated_negative_binomial_rdp(orders, rdp, eta: float, gamma: float) -> np.ndarray:
    """Theorem 2: the RDP curve of the best of K ~ D_{η,γ} trials, from one trial's curve ``rdp`` at
    ``orders`` (λ̂ ranges over the same orders, and order 1 when given)."""
    orders, rdp = np.asarray(orders, np.float64), np.asarray(rdp, np.float64)
    if not (eta > -1 and 0 < gamma < 1):
        raise ValueError(
            f"the truncated negative binomial needs eta > -1 and 0 < gamma < 1, got {eta}, {gamma}"
        )
    usable = orders >= 1
    hat = np.min(((1 - 1 / orders) * rdp + math.log(1 / gamma) / orders)[usable])
    bound = np.where(
        orders > 1,
        rdp
        + (1 + eta) * hat
        + math.log(truncated_negative_binomial_mean(eta, gamma)) / np.maximum(orders - 1, 1e-300),
        np.inf,
    )
    return _monotone(orders, bound)


def poisson_rdp(orders, rdp, mu: float, delta_at: Callable[[float], float] | None = None) -> np.ndarray:
    """Theorem 6: the RDP curve of the best of K ~ Poisson(μ) trials. ``delta_at(ε̂)`` is one trial's δ̂
    at ε̂ (default: from its RDP curve, dp-accounting's conversion); ε̂ = log(1 + 1/(λ-1)), the largest
    the theorem allows at order λ."""
    orders, rdp = np.asarray(orders, np.float64), np.asarray(rdp, np.float64)
    if not mu > 0:
        raise ValueError(f"the Poisson mean must be > 0, got {mu}")
    if delta_at is None:

        def delta_at(epsilon_hat: float) -> float:
            return rdp_lib.compute_delta(orders, rdp, epsilon_hat)[0]

    bound = np.full_like(orders, np.inf)
    for i, order in enumerate(orders):
        if order > 1:
            epsilon_hat = math.log1p(1 / (order - 1))
            bound[i] = rdp[i] + mu * delta_at(epsilon_hat) + math.log(mu) / (order - 1)
    return _monotone(orders, bound)


def tuned_rdp(orders, rdp, count: TrialCount) -> np.ndarray:
    """The RDP curve of releasing the best of K trials, K ~ ``count``."""
    if count.distribution == "poisson":
        return poisson_rdp(orders, rdp, count.mu)
    return truncated_negative_binomial_rdp(orders, rdp, count.eta, count.gamma)


def epsilon_from_rdp(orders, rdp, delta: float) -> float:
    """(ε, δ) from an RDP curve (dp-accounting's conversion, Canonne, Kamath & Steinke 2020).

    >>> round(epsilon_from_rdp([2.0, 4.0], [0.1, 0.2], 1e-5), 4)
    3.2879
    """
    return float(rdp_lib.compute_epsilon(list(orders), list(rdp), delta)[0])


def trial_rdp(event, orders: Sequence[float] = ORDERS, score_noise: float | None = None) -> np.ndarray:
    """One trial's RDP curve at ``orders`` (add/remove neighbours): its accounting event, plus a
    Gaussian of sensitivity 1 and std ``score_noise`` (the noisy score), when given.

    >>> from dpbench.privacy.batch_selection import PoissonSampler
    >>> event = PoissonSampler(60_000, 256, seed=0).dp_event(1.1, 100)
    >>> alone, scored = trial_rdp(event, [2.0, 8.0]), trial_rdp(event, [2.0, 8.0], score_noise=20.0)
    >>> [round(float(b - a), 6) for a, b in zip(alone, scored)]   # α / (2 · 20²)
    [0.0025, 0.01]
    """
    if score_noise is not None:
        event = dp_accounting.ComposedDpEvent([event, dp_accounting.GaussianDpEvent(score_noise)])
    accountant = dp_accounting.rdp.RdpAccountant(
        orders=[float(o) for o in orders],
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    accountant.compose(event)
    return np.asarray(accountant._rdp, dtype=np.float64)  # dp-accounting keeps the curve here (0.6)


def tuned_epsilon(
    events: Sequence, delta: float, count: TrialCount, score_noise: float | None, orders=ORDERS
) -> float:
    """Total ε of the released best trial, each trial one of ``events`` (chosen independently of the
    data: the pointwise largest RDP curve bounds the mixture, by quasi-convexity of Rényi divergence)."""
    rdp = np.max([trial_rdp(e, orders, score_noise) for e in events], axis=0)
    return epsilon_from_rdp(orders, tuned_rdp(orders, rdp, count), delta)


def calibrate_tuning(
    events_at: Callable[[float], Sequence],
    target_epsilon: float,
    delta: float,
    count: TrialCount,
    score_noise: float | None,
    tol: float = 1e-4,
) -> float:
    """The smallest σ (on a grid of ``tol``, rounded up) whose total ε with tuning is <= ``target_epsilon``;
    ``events_at(σ)`` gives the trials' accounting events at σ. Bisection (ε falls as σ grows).

    Raises ``ConfigError`` when even σ -> ∞ misses the target: the tuning's own cost (the count of
    trials, the noisy score) is then more than the whole budget.
    """

    def total(sigma: float) -> float:
        return tuned_epsilon(events_at(sigma), delta, count, score_noise)

    floor = total(1e6)
    if not floor < target_epsilon:
        noise = "" if score_noise is None else f", score noise {score_noise:g}"
        raise ConfigError(
            f"tune.epsilon={target_epsilon:g} is too small: the tuning alone costs ε={floor:.3g} at "
            f"δ={delta:g} (E[K]={count.mean:.3g} trials{noise}); "
            "choose a larger tune.epsilon, fewer trials, or a larger tune.score_noise"
        )
    low, high = 0.0, 1.0
    while total(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > tol:
        middle = (low + high) / 2
        if total(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    rounded = math.ceil(high / tol) * tol
    return float(f"{rounded:.10g}")
