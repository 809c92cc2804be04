"""Accounting matches raw dp_accounting, the reference table in ANCHORS.md, and closed forms."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from dpbench.privacy.accounting import (
    AccountantConfig,
    EpsilonTracker,
    calibrate_noise_multiplier,
    check_supported,
    compute_epsilon,
    privacy_summary,
)
from dpbench.privacy.batch_selection import PoissonSampler, ShuffleSampler

DELTA = 1e-5
# ../shared/ANCHORS.md, "Privacy accounting reference values": (batch, n, σ, steps, RDP ε, PLD ε).
ANCHOR_ROWS = [
    (256, 60_000, 1.12, 14_062, 2.519, 2.310),
    (240, 60_000, 1.3, 3_750, 0.922, 0.834),
    (600, 60_000, 4.0, 10_000, 1.035, 0.947),  # q = 0.01
]
# The table rounds to 3 decimals.
TABLE_TOLERANCE = 6e-4


def _raw_epsilon(accountant, q, sigma, steps):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return accountant.compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("batch, n, sigma, steps, rdp_table, pld_table", ANCHOR_ROWS)
def test_poisson_epsilon_matches_raw_dp_accounting_and_table(batch, n, sigma, steps, rdp_table, pld_table):
    sampler = PoissonSampler(n, batch, seed=0)
    ours_rdp = compute_epsilon(sampler, sigma, steps, DELTA, AccountantConfig(name="rdp"))
    ours_pld = compute_epsilon(sampler, sigma, steps, DELTA, AccountantConfig(name="pld"))
    assert ours_rdp == pytest.approx(_raw_epsilon(rdp.RdpAccountant(), batch / n, sigma, steps), rel=1e-9)
    assert ours_pld == pytest.approx(
        _raw_epsilon(pld.PLDAccountant(value_discretization_interval=1e-4), batch / n, sigma, steps), rel=1e-9
    )
    assert ours_rdp == pytest.approx(rdp_table, abs=TABLE_TOLERANCE)
    assert ours_pld == pytest.approx(pld_table, abs=TABLE_TOLERANCE)


@pytest.mark.parametrize("name, anchor_sigma", [("pld", 1.337), ("rdp", 1.425)])
def test_mnist_calibration_round_trip(name, anchor_sigma):
    # ANCHORS.md: ε=1, δ=1e-5, batch 256 of 60,000, 5000 steps.
    sampler = PoissonSampler(60_000, 256, seed=0)
    cfg = AccountantConfig(name=name)
    sigma = calibrate_noise_multiplier(sampler, 5000, 1.0, DELTA, cfg)
    assert sigma == pytest.approx(anchor_sigma, abs=1e-3)
    epsilon = compute_epsilon(sampler, sigma, 5000, DELTA, cfg)
    assert 0.99 <= epsilon <= 1.0


def test_shuffle_epsilon_is_replace_one_gaussian_per_epoch():
    # 25 steps of 256 from 1000 examples = 7 epochs (the last partial); per epoch one Gaussian with
    # sensitivity 2C and std σC. Composing 7 Gaussians of multiplier σ/2 is one of σ/(2√7).
    sampler = ShuffleSampler(1000, 256, seed=0)
    sigma, steps = 8.0, 25
    epochs = math.ceil(steps / 3)
    closed_form = dp_accounting.get_epsilon_gaussian(sigma / 2 / math.sqrt(epochs), DELTA)
    assert compute_epsilon(sampler, sigma, steps, DELTA, AccountantConfig(name="pld")) == pytest.approx(
        closed_form, rel=1e-3
    )


def test_unsupported_pairs_raise():
    # RDP reads replace-one Gaussians at half the sensitivity (google/differential-privacy#378).
    with pytest.raises(ValueError, match="cannot account sampler 'shuffle'"):
        check_supported(ShuffleSampler(1000, 10, seed=0), AccountantConfig(name="rdp"))
    with pytest.raises(ValueError, match="cannot account"):
        compute_epsilon(ShuffleSampler(1000, 10, seed=0), 1.0, 10, DELTA, AccountantConfig(name="rdp"))

    class WithoutReplacementSampler:  # an event dp_accounting's PLD accountant cannot handle
        name = "without_replacement"
        neighbouring = "replace_one"

        def dp_event(self, noise_multiplier, steps):
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.SampledWithoutReplacementDpEvent(
                    1000, 10, dp_accounting.GaussianDpEvent(noise_multiplier)
                ),
                steps,
            )

    with pytest.raises(ValueError, match="does not support"):
        check_supported(WithoutReplacementSampler(), AccountantConfig(name="pld"))
    with pytest.raises(ValueError, match="pld"):
        compute_epsilon(PoissonSampler(100, 10, seed=0), 1.0, 10, DELTA, AccountantConfig(name="gdp"))


def test_tracker_caches_and_guards_the_budget():
    sampler = PoissonSampler(60_000, 256, seed=0)
    tracker = EpsilonTracker(sampler, 1.1, DELTA, AccountantConfig(name="rdp"), budgeted_steps=1000)
    assert tracker.epsilon_at(0) == 0.0
    half, full = tracker.epsilon_at(500), tracker.epsilon_at(1000)
    assert 0 < half < full
    assert tracker.epsilon_at(1000) == full
    tracker.check_step(1000)
    with pytest.raises(RuntimeError, match="1000 logical steps"):
        tracker.check_step(1001)


def test_privacy_summary_is_recomputable():
    sampler = PoissonSampler(60_000, 256, seed=0)
    cfg = AccountantConfig(name="rdp")
    epsilon = compute_epsilon(sampler, 1.12, 100, DELTA, cfg)
    summary = privacy_summary(sampler, 1.12, 100, DELTA, 0.5, cfg, epsilon)
    mechanism = summary["mechanism"]
    assert mechanism["noise_std_on_sum"] == pytest.approx(0.56)
    assert summary["neighbouring"] == "add_remove"
    assert summary["dp_accounting_version"]
    recomputed = _raw_epsilon(
        rdp.RdpAccountant(), mechanism["sampling_rate"], 1.12, mechanism["logical_steps"]
    )
    assert summary["epsilon"] == pytest.approx(recomputed)


def test_rdp_convergence_warning_is_said_once_and_epsilon_unchanged(caplog):
    """dp_accounting warns at every ε computation when a fractional order's series does not converge
    (small σ, here the SST-2 grid's σ = 0.60 at q = 0.028); dpbench lets it through once per process.
    The ε itself is dp_accounting's, untouched by the filter."""
    import logging

    from dpbench.privacy import accounting

    (once,) = [
        f for f in logging.getLogger("absl").filters if isinstance(f, accounting._OnceRdpConvergenceWarning)
    ]
    once.seen = False
    sampler = PoissonSampler(num_examples=9_200, expected_batch_size=256, seed=0)
    cfg = AccountantConfig(name="rdp")
    with caplog.at_level(logging.WARNING, logger="absl"):
        epsilons = [compute_epsilon(sampler, 0.6006, steps, 4.36e-5, cfg) for steps in (100, 108)]
    warnings = [r for r in caplog.records if "failed to converge" in r.getMessage()]
    assert len(warnings) == 1 and "shown once" in warnings[0].getMessage()
    raw = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    raw.compose(sampler.dp_event(0.6006, 108))
    assert epsilons[1] == raw.get_epsilon(4.36e-5)
