"""Empirical privacy lower bounds from one training run (Steinke, Nasr & Jagielski 2023).

Protocol (arXiv:2305.08846, "Privacy auditing with one (1) training run"):

1. Take m canaries; include each in the training set independently with probability 1/2
   (:func:`draw_canary_inclusion`). Everything else about the run is fixed.
2. Train once. Score every canary, higher meaning "more likely trained on" (e.g. minus its loss).
3. Guess "in" for the k+ highest scores, "out" for the k- lowest, abstain on the rest.
4. Under (ε, δ)-DP, the number of correct guesses among r = k+ + k- is stochastically dominated by
   Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3.1 / Algorithm 2). The reported
   bound is the largest ε whose p-value is still at most the significance level: with probability
   >= ``confidence``, the mechanism is not (ε', δ)-DP for any ε' below it.

The p-value and the search for ε are jax_privacy's (``jax_privacy.auditing.CanaryScoreAuditor.
epsilon_one_run``, at an explicit threshold): dpbench keeps only the guess grid and the two-sided
guesses, which jax_privacy's auditor (one-sided, k- = 0) takes as counts (:func:`_counts_auditor`).
dpbench's former copy of the p-value gave the same ε to the last digit on 300 random (m, r, v, δ)
and on the committed MNIST audit (``tests/privacy/test_audit_stats.py``), and was removed.

Trying several (k+, k-) and keeping the best is multiple testing, so each of the G tested pairs
uses significance (1 - confidence) / G (Bonferroni); the maximum is then a valid bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jax_privacy import auditing

from dpbench.errors import ConfigError, check_choice
from dpbench.schema import schema

# Fractions of the m canaries guessed in total (half "in", half "out") for the default grid.
_DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_CANARY_STREAM = 2  # keeps canary coin flips apart from the samplers' streams for the same seed


AUDITS = ("none", "canary")


@schema("audit")
@dataclasses.dataclass
class AuditConfig:
    """An empirical privacy audit of the run: canary examples inserted at random, then guessed."""

    name: str = "none"  # none | canary
    # Canaries m, each trained on with probability 1/2; of the type the task declares (image,
    # sentence or dialogue); at most the number of real training examples.
    num_canaries: int = 1000
    confidence: float = 0.95
    seed: int = 1234
    # Dialogue canaries (summarisation): digits of each random secret code (10**secret_digits secrets).
    secret_digits: int = 6
    # Dialogue canaries: other secrets scored per canary for its exposure (0: no exposure).
    exposure_candidates: int = 100


def check_settings(cfg) -> None:
    """The ``audit.*`` settings, before anything loads."""
    check_choice("audit.name", cfg.name, AUDITS)
    if cfg.name != "canary":
        return
    if cfg.num_canaries < 2:
        raise ConfigError(
            f"audit.num_canaries={cfg.num_canaries} is not allowed; choose at least 2 (some in, some out)"
        )
    if not 1 <= cfg.secret_digits <= 18:
        raise ConfigError(f"audit.secret_digits={cfg.secret_digits} is not allowed; choose 1 to 18")
    if cfg.exposure_candidates < 0:
        raise ConfigError(
            f"audit.exposure_candidates={cfg.exposure_candidates} is not allowed; choose 0 (none) or more"
        )


def draw_canary_inclusion(m: int, seed: int) -> np.ndarray:
    """Independent fair coins: which of the m canaries join the training set.

    >>> included = draw_canary_inclusion(8, seed=0)
    >>> included.dtype.name, bool(np.array_equal(included, draw_canary_inclusion(8, seed=0)))
    ('bool', True)
    """
    if m <= 0:
        raise ValueError(f"number of canaries m must be positive, got {m}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CANARY_STREAM]))
    return rng.random(m) < 0.5


def _counts_auditor(m: int, num_guesses: int, num_correct: int) -> auditing.CanaryScoreAuditor:
    """A jax_privacy auditor over m canaries whose threshold 1 makes ``num_guesses`` guesses, of which
    ``num_correct`` are right.

    The one-run statistic depends on the guesses only through (m, r, v). jax_privacy's auditor guesses
    "in" above a threshold (its k- = 0); a guess "out" is the same test on the canary with its coin
    flipped (a fair coin still, and DP is symmetric in the two neighbours), so every (k+, k-) guess
    maps to one-sided guesses: the right guesses are held-in canaries scoring 1, the wrong ones
    held-out canaries scoring 1, and the canaries not guessed score 0.
    """
    wrong, left = num_guesses - num_correct, m - num_guesses
    if num_correct == 0:
        raise ValueError("no correct guess: nothing to audit")
    # jax_privacy needs a held-out canary; when every canary is guessed and right there is none, and
    # one more canary, never guessed, is added: m + 1 only enlarges the δ term (a smaller, valid bound).
    in_scores = np.r_[np.ones(num_correct), np.zeros(left // 2)]
    out_scores = np.r_[np.ones(wrong), np.zeros(left - left // 2 if wrong or left else 1)]
    return auditing.CanaryScoreAuditor(in_scores, out_scores)


def epsilon_for_guesses(
    m: int, num_guesses: int, num_correct: int, delta: float, significance: float
) -> float:
    """Largest ε that r guesses with v right refute at ``significance`` (0 if none): jax_privacy's
    ``CanaryScoreAuditor.epsilon_one_run`` (Steinke, Nasr & Jagielski 2023, Theorem 3.1 with its δ
    term) at one explicit threshold.

    >>> epsilon_for_guesses(m=100, num_guesses=100, num_correct=50, delta=1e-5, significance=0.05)
    0.0
    >>> round(epsilon_for_guesses(m=100, num_guesses=100, num_correct=100, delta=1e-5, significance=0.05), 2)
    3.49
    """
    if not 0 <= num_correct <= num_guesses <= m or m < 2:
        raise ValueError(
            f"need 0 <= num_correct <= num_guesses <= m, m >= 2, got {num_correct}, {num_guesses}, {m}"
        )
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    if num_correct == 0:
        return 0.0
    auditor = _counts_auditor(m, num_guesses, num_correct)
    return float(
        auditor.epsilon_one_run(significance, delta, threshold_strategy=auditing.Explicit(threshold=1.0))
    )


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs guessing 1% .. 100% of the canaries, half "in" and half "out".

    >>> default_guess_grid(1000)
    [(5, 5), (10, 10), (25, 25), (50, 50), (100, 100), (250, 250), (500, 500)]
    """
    halves = sorted({max(1, round(fraction * m / 2)) for fraction in _DEFAULT_GUESS_FRACTIONS})
    return [(k, min(k, m - k)) for k in halves if k <= m]


def epsilon_lower_bound(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    k_values: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Best ε lower bound over a grid of (k+, k-) guess counts, Bonferroni-corrected over the grid.

    ``scores[i]`` is canary i's membership score (higher = more likely trained on) and
    ``included[i]`` whether it was. ``k_values`` lists (k+, k-) pairs; None -> :func:`default_guess_grid`.

    >>> included = draw_canary_inclusion(200, seed=1)  # 103 of 200 included
    >>> result = epsilon_lower_bound(included.astype(float), included, delta=1e-10)  # perfect scores
    >>> result["k_plus"], result["k_minus"], result["num_correct"], round(result["epsilon_lower_bound"], 2)
    (50, 50, 100, 2.98)
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(
            f"scores and included must be 1-D and equally long, got {scores.shape}, {included.shape}"
        )
    if included.dtype != bool:
        raise ValueError(f"included must be a bool array, got dtype {included.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    m = len(scores)
    grid = default_guess_grid(m) if k_values is None else [(int(kp), int(km)) for kp, km in k_values]
    for k_plus, k_minus in grid:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > m:
            raise ValueError(
                f"each (k+, k-) needs k+, k- >= 0 and 0 < k+ + k- <= m={m}, got {(k_plus, k_minus)}"
            )
    significance = (1 - confidence) / len(grid)

    order = np.argsort(-scores, kind="stable")  # highest score first
    best = None
    for k_plus, k_minus in grid:
        correct_in = int(included[order[:k_plus]].sum())
        correct_out = int((~included[order[m - k_minus :]]).sum()) if k_minus else 0
        num_correct, num_guesses = correct_in + correct_out, k_plus + k_minus
        epsilon = epsilon_for_guesses(m, num_guesses, num_correct, delta, significance)
        if best is None or epsilon > best["epsilon_lower_bound"]:
            best = {
                "epsilon_lower_bound": epsilon,
                "k_plus": k_plus,
                "k_minus": k_minus,
                "num_guesses": num_guesses,
                "num_correct": num_correct,
                "accuracy": num_correct / num_guesses,
            }
    return {
        **best,
        "m": m,
        "num_included": int(included.sum()),
        "delta": delta,
        "confidence": confidence,
        "grid_size": len(grid),
        "significance_per_test": significance,
        "method": "one-run audit, Steinke, Nasr & Jagielski 2023; Bonferroni over (k+, k-) grid",
    }
