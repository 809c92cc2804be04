"""One-run audit statistics: informative when membership leaks, valid (rarely above the truth) otherwise.

The bound is jax_privacy's (``jax_privacy.auditing``); these tests check it against dpbench's committed
MNIST audit (computed by dpbench's former copy of the p-value), a closed form and simulations.
"""

import json
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

from dpbench.privacy.audit import (
    _counts_auditor,
    default_guess_grid,
    draw_canary_inclusion,
    epsilon_for_guesses,
    epsilon_lower_bound,
)
from tests.helpers import REPO

M = 1000
DELTA = 1e-5


def _randomized_response_scores(included: np.ndarray, epsilon: float, seed: int) -> np.ndarray:
    # ε-DP randomized response on each canary's bit; tiny noise only breaks ties in the ranking.
    rng = np.random.default_rng(seed)
    flip = rng.random(len(included)) < 1 / (1 + math.exp(epsilon))
    return (included ^ flip).astype(float) + 1e-3 * rng.random(len(included))


def test_inclusion_is_fair_and_seeded():
    included = draw_canary_inclusion(10_000, seed=0)
    # Binomial(10000, 1/2): standard deviation 50, so 4 sigma = 200.
    assert abs(int(included.sum()) - 5000) < 200
    assert np.array_equal(included, draw_canary_inclusion(10_000, seed=0))
    assert not np.array_equal(included, draw_canary_inclusion(10_000, seed=1))


def test_jax_privacy_reproduces_the_committed_mnist_audit():
    # results/runs/audit/nonprivate.json was audited by dpbench's own p-value (since removed):
    # m = 1000, 195 of 200 guesses right at (k+, k-) = (100, 100), δ = 1e-5, 95% over a 7-pair grid.
    record = json.loads((REPO / "results/runs/audit/nonprivate.json").read_text())["audit"]
    grid = default_guess_grid(record["m"])
    assert (record["k_plus"], record["k_minus"]) in grid and len(grid) == 7
    significance = (1 - record["confidence"]) / len(grid)
    epsilon = epsilon_for_guesses(
        record["m"], record["num_guesses"], record["num_correct"], 1e-5, significance
    )
    assert round(epsilon, 3) == record["epsilon_lower_bound"] == 2.614


def test_all_correct_guesses_match_the_closed_form():
    # δ -> 0 and v = r: the p-value is q^r, so the bound is logit(significance^(1/r)).
    for r in (10, 100, 400):
        expected = scipy.special.logit(0.01 ** (1 / r))
        assert epsilon_for_guesses(1000, r, r, 1e-12, 0.01) == pytest.approx(expected, abs=1e-4)


def test_at_zero_epsilon_the_bound_is_the_fair_coin_test():
    # Refuting ε = 0 means the fair-coin tail P[Binomial(r, 1/2) >= v] is below the significance.
    r, v = 40, 28
    tail = scipy.stats.binom.sf(v - 1, r, 0.5)  # 0.0083
    assert epsilon_for_guesses(M, r, v, 1e-12, significance=tail * 1.01) > 0
    assert epsilon_for_guesses(M, r, v, 1e-12, significance=tail * 0.99) == 0


def test_counts_become_one_sided_guesses_for_jax_privacy():
    auditor = _counts_auditor(m=50, num_guesses=20, num_correct=15)
    in_scores, out_scores = auditor._in_canary_scores, auditor._out_canary_scores  # noqa: SLF001
    assert len(in_scores) + len(out_scores) == 50
    assert (in_scores == 1).sum() == 15 and (out_scores == 1).sum() == 5
    # every canary guessed and right: one never-guessed canary is added (a smaller, valid bound)
    everything = _counts_auditor(m=10, num_guesses=10, num_correct=10)
    assert len(everything._out_canary_scores) == 1 and everything._out_canary_scores[0] == 0  # noqa: SLF001


def test_perfectly_separated_scores_give_a_large_bound():
    included = draw_canary_inclusion(M, seed=0)
    result = epsilon_lower_bound(included.astype(float), included, delta=DELTA)
    assert result["accuracy"] == 1.0
    assert result["epsilon_lower_bound"] > 2


def test_random_scores_give_no_bound():
    # Scores independent of membership: the run is 0-DP, so a positive bound is a false claim. With
    # a 95% confidence level it may happen in at most ~5% of runs; P[>= 7 of 40] < 0.002 at 5%.
    positives = []
    for seed in range(40):
        included = draw_canary_inclusion(M, seed=seed)
        scores = np.random.default_rng(1000 + seed).random(M)
        positives.append(epsilon_lower_bound(scores, included, delta=DELTA)["epsilon_lower_bound"])
    assert sum(bound > 0 for bound in positives) <= 6
    assert max(positives) < 0.5


def test_randomized_response_bound_is_valid_and_informative():
    true_epsilon = 1.0
    bounds = []
    for seed in range(20):
        included = draw_canary_inclusion(M, seed=seed)
        scores = _randomized_response_scores(included, true_epsilon, seed=500 + seed)
        bounds.append(epsilon_lower_bound(scores, included, delta=1e-10)["epsilon_lower_bound"])
    # Valid: above the true ε in at most ~5% of runs (P[>= 4 of 20] < 0.02 at 5%).
    assert sum(bound > true_epsilon for bound in bounds) <= 3
    # Informative: with 1000 canaries most of the true ε is recovered.
    assert np.median(bounds) > 0.5 * true_epsilon


def test_bound_is_monotone_in_correct_guesses():
    correct_counts = range(250, 501, 10)
    bounds = [epsilon_for_guesses(M, 500, correct, DELTA, significance=0.05) for correct in correct_counts]
    assert all(later >= earlier for earlier, later in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > bounds[len(bounds) // 2] > 0


def test_bad_inputs_fail_early():
    included = draw_canary_inclusion(10, seed=0)
    with pytest.raises(ValueError, match="equally long"):
        epsilon_lower_bound(np.zeros(9), included, delta=DELTA)
    with pytest.raises(ValueError, match="bool"):
        epsilon_lower_bound(np.zeros(10), included.astype(int), delta=DELTA)
    with pytest.raises(ValueError, match=r"k\+"):
        epsilon_lower_bound(np.zeros(10), included, delta=DELTA, k_values=[(6, 6)])
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(np.zeros(10), included, delta=DELTA, confidence=1.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(np.zeros(10), included, delta=0.0)
