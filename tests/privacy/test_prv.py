"""accountant=prv: PRV agrees with PLD within its error bound, calibrates, refuses clearly, runs."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld

from dpbench import config as config_lib
from dpbench.privacy.accounting import (
    AccountantConfig,
    calibrate_noise_multiplier,
    check_supported,
    compute_epsilon,
    make_accountant,
    privacy_summary,
)
from dpbench.privacy.batch_selection import PoissonSampler, ShuffleSampler
from dpbench.privacy.prv import PrvAccountant
from tests.helpers import FIXTURE_DATA, TINY, compose_config, run_cli

DELTA = 1e-5
PRV = AccountantConfig(name="prv")  # eps_error 0.01, delta_error δ/1000
# ../shared/ANCHORS.md, "Privacy accounting reference values" (Poisson-subsampled Gaussian,
# add/remove, δ=1e-5; sources: TF Privacy tutorial, Opacus MNIST example, Abadi et al. 2016):
# (q, σ, steps, published ε, PLD ε with discretisation 1e-4).
ANCHOR_ROWS = [
    (256 / 60_000, 1.12, 14_062, 2.92, 2.310),
    (240 / 60_000, 1.3, 3_750, 1.16, 0.834),
    (0.01, 4.0, 10_000, 1.26, 0.947),
]
# PLD's own slack: the table rounds to 3 decimals (5e-4), and PLD's pessimistic discretisation
# adds up to ~1.3e-4 on these rows (measured against PRV's estimate).
PLD_SLACK = 1e-3


def _poisson_event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


@pytest.mark.parametrize("q, sigma, steps, published, pld_table", ANCHOR_ROWS)
def test_prv_agrees_with_pld_within_its_error_bound(q, sigma, steps, published, pld_table):
    accountant = PrvAccountant()
    epsilon = accountant.compose(_poisson_event(q, sigma, steps)).get_epsilon(DELTA)
    lower, estimate, upper = accountant.last_epsilon_bounds
    assert accountant.last_method == "prv" and accountant.last_delta_error == pytest.approx(DELTA / 1000)
    assert epsilon == upper  # the reported ε is the upper bound
    assert abs(estimate - pld_table) <= accountant.eps_error + PLD_SLACK
    assert lower - PLD_SLACK <= pld_table <= upper + PLD_SLACK
    assert upper >= pld_table - PLD_SLACK  # never below the (pessimistic) PLD value beyond its slack
    assert upper < published  # tighter than the classic RDP conversion older papers used


def test_compute_epsilon_with_prv_is_the_upper_bound():
    q, sigma, steps, _, _ = ANCHOR_ROWS[1]
    sampler = PoissonSampler(60_000, 240, seed=0)
    epsilon = compute_epsilon(sampler, sigma, steps, DELTA, PRV)
    accountant = make_accountant(PRV, "add_remove")
    assert epsilon == accountant.compose(_poisson_event(q, sigma, steps)).get_epsilon(DELTA)
    assert epsilon == accountant.last_epsilon_bounds.upper
    summary = privacy_summary(sampler, sigma, steps, DELTA, 1.0, PRV, epsilon)
    record = summary["accountant"]
    assert record["name"] == "prv" and record["eps_error"] == 0.01 and record["delta_error"] == DELTA / 1000
    assert record["eps_lower"] <= record["eps_estimate"] <= record["eps_upper"] == epsilon
    assert record["reported_epsilon"] == "eps_upper" and record["method"] == "prv"
    assert summary["prv_accountant_version"] == "0.2.0"
    json.dumps(summary)


def test_shuffle_sampler_replace_one_gaussian_matches_pld():
    # One Gaussian per epoch under replace-one: PRV with l2 sensitivity 2C against PLD's REPLACE_ONE.
    sampler = ShuffleSampler(1000, 100, seed=0)
    check_supported(sampler, PRV)  # supported: no error
    for sigma, steps in [(2.0, 30), (5.0, 400)]:
        ours = compute_epsilon(sampler, sigma, steps, DELTA, PRV)
        reference = compute_epsilon(sampler, sigma, steps, DELTA, AccountantConfig(name="pld"))
        assert reference - 1e-4 <= ours <= reference + 0.011  # upper bound: at most ~eps_error above
    # Add/remove-one Gaussians (q=1 is a plain Gaussian) use sensitivity C.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(3.0)), 5
    )
    reference = pld.PLDAccountant().compose(event).get_epsilon(DELTA)
    assert reference - 1e-4 <= PrvAccountant().compose(event).get_epsilon(DELTA) <= reference + 0.011


def test_composed_heterogeneous_events_and_edge_cases():
    event = dp_accounting.ComposedDpEvent(
        [_poisson_event(0.01, 1.0, 50), _poisson_event(0.02, 2.0, 30), dp_accounting.NoOpDpEvent()]
    )
    reference = pld.PLDAccountant().compose(event).get_epsilon(DELTA)
    accountant = PrvAccountant()
    assert reference - 1e-4 <= accountant.compose(event).get_epsilon(DELTA) <= reference + 0.011
    assert PrvAccountant().compose(_poisson_event(0.01, 0.0, 3)).get_epsilon(DELTA) == math.inf
    assert PrvAccountant().compose(_poisson_event(0.0, 1.0, 3)).get_epsilon(DELTA) == 0.0
    assert PrvAccountant().get_epsilon(DELTA) == 0.0
    # delta from epsilon: the upper bound, consistent with get_epsilon.
    accountant = PrvAccountant(delta_error=1e-9).compose(_poisson_event(0.01, 1.0, 50))
    epsilon = accountant.get_epsilon(DELTA)
    assert accountant.get_delta(epsilon) <= DELTA * 1.01
    assert accountant.last_delta_bounds[0] <= accountant.last_delta_bounds[2]


def test_huge_grid_falls_back_to_the_rdp_upper_bound(caplog):
    event = _poisson_event(0.01, 1.0, 50)
    accountant = PrvAccountant(max_domain_points=10)
    epsilon = accountant.compose(event).get_epsilon(DELTA)
    assert accountant.last_method.startswith("rdp (fallback: its grid would have")
    assert accountant.last_epsilon_bounds == (0.0, epsilon, epsilon)
    assert epsilon >= pld.PLDAccountant().compose(event).get_epsilon(DELTA)
    assert "reporting the RDP upper bound" in caplog.text


def test_calibration_with_prv_hits_the_target():
    sampler = PoissonSampler(1000, 50, seed=0)
    sigma = calibrate_noise_multiplier(sampler, 20, 2.0, DELTA, PRV)
    epsilon = compute_epsilon(sampler, sigma, 20, DELTA, PRV)
    assert 1.98 <= epsilon <= 2.0  # the upper bound spends at most the target
    # PLD at PRV's σ: below the target by about PRV's eps_error (PRV reports its upper bound).
    assert 1.98 <= compute_epsilon(sampler, sigma, 20, DELTA, AccountantConfig(name="pld")) <= 2.0


@pytest.mark.slow
def test_mnist_calibration_with_prv():
    # ANCHORS.md: ε=1, δ=1e-5, batch 256 of 60,000, 5000 steps: σ ≈ 1.337 with PLD (PRV: 1.3460).
    sampler = PoissonSampler(60_000, 256, seed=0)
    sigma = calibrate_noise_multiplier(sampler, 5000, 1.0, DELTA, PRV)
    assert 1.337 <= sigma <= 1.35
    assert 0.99 <= compute_epsilon(sampler, sigma, 5000, DELTA, PRV) <= 1.0


class _ReplaceOnePoisson(PoissonSampler):
    name = "poisson_replace_one"
    neighbouring = "replace_one"


class _LaplaceSampler(PoissonSampler):
    name = "laplace"

    def dp_event(self, noise_multiplier, steps):
        return dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(noise_multiplier), steps)


@pytest.mark.parametrize(
    "sampler, reason",
    [
        (_ReplaceOnePoisson(100, 10, seed=0), "would under-report epsilon for replace-one neighbours"),
        (_LaplaceSampler(100, 10, seed=0), "cannot account LaplaceDpEvent"),
    ],
)
def test_refused_events_and_relations_give_one_line(sampler, reason):
    with pytest.raises(ValueError) as error:
        check_supported(sampler, PRV)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert message.startswith(f"accountant 'prv' cannot account sampler {sampler.name!r}")
    relation = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert not PrvAccountant(relation).supports(_poisson_event(0.1, 1.0, 1))
    with pytest.raises(dp_accounting.UnsupportedEventError):
        PrvAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE).compose(_poisson_event(0.1, 1.0, 1))


@pytest.mark.parametrize(
    "override, message",
    [
        ("accountant.eps_error=0", r"accountant.eps_error=0.0 is not allowed; choose a number > 0"),
        ("accountant.delta_error=1e-3", r"accountant.delta_error=0.001 is not allowed; choose null"),
    ],
)
def test_bad_prv_settings_are_config_errors(override, message):
    cfg = compose_config(["accountant=prv", override])
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_static(cfg)
    with pytest.raises(ValueError, match=r"accountant\.(eps|delta)_error"):
        PrvAccountant(
            eps_error=-1.0 if "eps" in override else 0.01, delta_error=2.0 if "delta" in override else None
        )


def test_delta_error_not_below_the_resolved_delta_is_a_config_error():
    # With dp.delta_exponent, δ is known only once n is: 1000^-1.1 = 5e-4 < delta_error = 1e-3.
    cfg = compose_config(
        ["accountant=prv", "accountant.delta_error=1e-3", "dp.delta=null", "dp.delta_exponent=1.1"]
    )
    config_lib.validate_static(cfg)
    with pytest.raises(
        config_lib.ConfigError, match=r"accountant.delta_error=0.001 is not allowed; .*n=1000"
    ):
        config_lib.resolve_delta(cfg, 1000)
    cfg.accountant.delta_error = 1e-7
    assert config_lib.resolve_delta(cfg, 1000) == pytest.approx(1000**-1.1)


def _run(module, *args):
    return run_cli("-m", module, *args)


TINY_MNIST = [
    f"dataset.data_dir={FIXTURE_DATA}/mnist",
    "dataset.max_train_examples=256",
    "dataset.max_eval_examples=64",
    "runner.batch_size=32",
    "runner.steps=2",
]


def test_privacy_cli_plans_with_prv(tmp_path):
    done = _run("dpbench.privacy", "accountant=prv", *TINY_MNIST, f"hydra.run.dir={tmp_path}")
    rows = [line.split("  ", 1) for line in done.stdout.strip().splitlines() if not line.startswith("[")]
    plan = {name.strip(): value.strip() for name, value in rows}
    assert plan["accountant"].startswith("prv (eps_error=0.01, delta_error=1e-08 (δ/1000)")
    assert "upper bound" in plan["accountant"]
    assert 0.98 <= float(plan["ε"]) <= 1.0  # calibrated to the default dp.epsilon=1


def test_training_cli_records_the_prv_bounds(tmp_path):
    _run(
        "dpbench",
        "accountant=prv",
        *TINY,
        f"dataset.data_dir={FIXTURE_DATA}/mnist",
        f"hydra.run.dir={tmp_path}",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    record = results["privacy"]["accountant"]
    assert record["name"] == "prv" and record["method"] == "prv"
    assert record["eps_lower"] <= record["eps_estimate"] <= record["eps_upper"] == results["epsilon"] <= 1.0
    assert record["delta_error"] == pytest.approx(results["delta"] / 1000)
    assert results["privacy"]["mechanism"]["logical_steps"] == 2
    assert results["reproducibility"]["command"].startswith("python -m dpbench accountant=prv ")
