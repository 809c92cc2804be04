"""Hyperparameter tuning inside the budget (dpbench/privacy/tuning.py, python -m dpbench.tune).

The bound is checked against the paper's corollaries in closed form (Papernot & Steinke 2022:
pure DP gives (2+η)ε, Liu & Talwar's 3ε for the geometric law; the Gaussian case of Corollary 4;
Poisson with a pure-DP trial), against dp-accounting's independent ``RepeatAndSelectDpEvent``, and
for its limits and monotonicity; the command's selection against a direct recomputation.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from hydra import compose, initialize_config_dir

from dpbench.errors import ConfigError
from dpbench.privacy import tuning
from dpbench.privacy.randomness import PrivacyRandomness
from tests.helpers import CONF_DIR, FIXTURE_DATA, TINY

ORDERS = np.array(tuning.ORDERS)
DPSGD = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(1024 / 50_000, dp_accounting.GaussianDpEvent(2.0)), 1465
)


def tnb(eta, gamma):
    return tuning.TrialCount("truncated_negative_binomial", eta=eta, gamma=gamma)


@pytest.mark.parametrize("eta", [-0.5, 0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("gamma", [0.05, 0.3, 0.8])
def test_truncated_negative_binomial_pmf_sums_to_one_with_its_mean(eta, gamma):
    k = np.arange(0, 5000)
    p = tnb(eta, gamma).pmf(k)
    assert p[0] == 0 and np.all(p >= 0)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert (k * p).sum() == pytest.approx(tuning.truncated_negative_binomial_mean(eta, gamma), rel=1e-9)


def test_eta_one_is_the_geometric_law_and_eta_zero_the_logarithmic():
    k = np.arange(1, 30)
    assert tnb(1.0, 0.3).pmf(k) == pytest.approx(0.3 * 0.7 ** (k - 1), rel=1e-12)
    assert tnb(0.0, 0.3).pmf(k) == pytest.approx(0.7**k / (k * math.log(1 / 0.3)), rel=1e-12)
    assert tnb(1.0, 0.25).mean == pytest.approx(4.0)


@pytest.mark.parametrize(
    "count",
    [tnb(-0.5, 0.2), tnb(0.0, 0.2), tnb(1.0, 0.25), tnb(2.0, 0.5), tuning.TrialCount("poisson", mu=3.0)],
)
def test_sampler_draws_the_distribution(count):
    rng = np.random.default_rng(1)
    draws = np.array([count.sample(rng) for _ in range(20_000)])
    values, counts = np.unique(draws, return_counts=True)
    assert draws.mean() == pytest.approx(count.mean, rel=0.05)
    frequent = counts > 500
    assert counts[frequent] / len(draws) == pytest.approx(count.pmf(values[frequent]), abs=0.015)


@pytest.mark.parametrize(
    ("mean", "shape", "count"),
    [
        (None, 0.0, tnb(0.0, 0.1)),
        (None, 0.5, tnb(0.5, 0.1)),
        (4.0, 1.0, tnb(1.0, 0.25)),
        (None, 3.0, tnb(3.0, 0.4)),
        (4.0, np.inf, tuning.TrialCount("poisson", mu=4.0)),
        (20.0, np.inf, tuning.TrialCount("poisson", mu=20.0)),
    ],
)
def test_bound_equals_dp_accountings_repeat_and_select(mean, shape, count):
    """dp-accounting implements Theorems 2 and 6 from E[K] (an independent implementation)."""
    rdp = tuning.trial_rdp(DPSGD, ORDERS)
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(dp_event.RepeatAndSelectDpEvent(DPSGD, mean or count.mean, shape))
    theirs = tuning._monotone(ORDERS, np.asarray(accountant._rdp))
    assert tuning.tuned_rdp(ORDERS, rdp, count) == pytest.approx(theirs, rel=1e-8)
    assert tuning.tuned_epsilon([DPSGD], 1e-5, count, None) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-8
    )


@pytest.mark.parametrize("eta", [-0.5, 0.0, 1.0, 2.0])
def test_pure_dp_trial_costs_two_plus_eta_epsilon(eta):
    """Corollary 3: an ε-DP trial gives (2+η)ε; η = 1 is Liu & Talwar's 3ε."""
    epsilon, orders = 0.3, np.array([2.0, 10.0, 1e10])
    bound = tuning.truncated_negative_binomial_rdp(orders, np.full(3, epsilon), eta, 0.01)
    assert bound[-1] == pytest.approx((2 + eta) * epsilon, rel=1e-6)


@pytest.mark.parametrize(
    ("rho", "gamma", "eta"), [(0.01, 0.01, 0.0), (0.1, 0.1, 0.5), (1.0, 0.1, 1.0), (0.5, 0.2, -0.5)]
)
def test_gaussian_trial_matches_corollary_4(rho, gamma, eta):
    """ρ-zCDP trial (RDP ρλ): ε'(λ) = ρ(λ-1) + log E[K]/(λ-1) + 2(1+η)√(ρ log 1/γ) - ηρ for λ at or
    above the minimiser 1 + √(log E[K]/ρ), and its value there below it."""
    mean = tuning.truncated_negative_binomial_mean(eta, gamma)
    best = 1 + math.sqrt(math.log(mean) / rho)
    orders = np.array([1.5, 2.0, math.sqrt(math.log(1 / gamma) / rho), best, 3.0, 10.0, 100.0])
    bound = tuning.truncated_negative_binomial_rdp(orders, rho * orders, eta, gamma)
    shift = 2 * (1 + eta) * math.sqrt(rho * math.log(1 / gamma)) - eta * rho
    for order, value in zip(orders, bound):
        at = max(order, best)
        assert value == pytest.approx(rho * (at - 1) + math.log(mean) / (at - 1) + shift, rel=1e-9), order


@pytest.mark.parametrize(("epsilon", "mu"), [(0.1, 2.0), (1.0, 10.0), (2.0, 1000.0)])
def test_poisson_with_a_pure_dp_trial(epsilon, mu):
    """Theorem 6 at λ = 1 + 1/(e^ε - 1), where e^ε̂ = e^ε so δ̂ = 0: Laplace RDP + (e^ε - 1) log μ."""
    alpha = 1 + 1 / math.expm1(epsilon)
    orders = np.array([alpha, 1e10])
    laplace = np.array([rdp_lib._laplace_rdp(epsilon, a) for a in orders])
    bound = tuning.poisson_rdp(orders, laplace, mu)
    assert bound[0] == pytest.approx(laplace[0] + math.expm1(epsilon) * math.log(mu), rel=1e-9)


def test_one_trial_costs_one_trial_and_more_trials_cost_more():
    rdp = tuning.trial_rdp(DPSGD, ORDERS)
    with_one = np.concatenate([[1.0], ORDERS])  # λ̂ = 1 (KL) makes the γ -> 1 limit exact
    rdp_one = np.concatenate([[tuning.trial_rdp(DPSGD, [1.0001])[0]], rdp])
    almost_one = tuning.truncated_negative_binomial_rdp(with_one, rdp_one, 1.0, 1 - 1e-9)
    assert almost_one[1:] == pytest.approx(rdp, abs=1e-6)
    previous = rdp
    for gamma in (0.9, 0.5, 0.2, 0.05):  # E[K] = 1/γ grows
        bound = tuning.tuned_rdp(ORDERS, rdp, tnb(1.0, gamma))
        assert np.all(bound >= previous - 1e-12)
        previous = bound
    totals = [
        tuning.tuned_epsilon([DPSGD], 1e-5, tuning.TrialCount("poisson", mu=mu), None) for mu in (1, 2, 8, 32)
    ]
    assert totals == sorted(totals) and totals[0] > tuning.epsilon_from_rdp(ORDERS, rdp, 1e-5)


def test_calibration_meets_the_total_and_no_smaller_sigma_does():
    def events_at(sigma):
        return [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(sigma)), 500
            )
        ]

    count = tuning.TrialCount("poisson", mu=4.0)
    sigma = tuning.calibrate_tuning(events_at, 1.0, 1e-5, count, 20.0)
    assert tuning.tuned_epsilon(events_at(sigma), 1e-5, count, 20.0) <= 1.0
    assert tuning.tuned_epsilon(events_at(sigma - 2e-4), 1e-5, count, 20.0) > 1.0
    with pytest.raises(ConfigError, match=r"tune.epsilon=0.05 is too small: the tuning alone costs"):
        tuning.calibrate_tuning(events_at, 0.05, 1e-5, count, 20.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"distribution": "fixed"}, "tune.distribution=fixed is a deterministic number of trials"),
        ({"distribution": "grid"}, "needs a random, secret K"),
        ({"distribution": "uniform"}, "tune.distribution='uniform' is not allowed; choose one of poisson"),
        ({"mu": 0.0}, "tune.mu=0.0 is not allowed; choose a number > 0"),
        ({"distribution": "truncated_negative_binomial", "gamma": 1.0}, "a deterministic K"),
        ({"distribution": "truncated_negative_binomial", "eta": -1.0}, "tune.eta=-1.0 is not allowed"),
        ({"epsilon": -1.0}, "tune.epsilon=-1.0 is not allowed"),
        ({"score": "loss"}, "tune.score='loss' is not allowed"),
        ({"score_noise": 0.0}, "tune.score_noise=0.0 is not allowed"),
    ],
)
def test_bad_settings_are_refused_naming_them(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tuning.check_settings(tuning.TuneConfig(**settings))


def test_score_must_match_what_is_private():
    with pytest.raises(ConfigError, match="tune.score=eval scores on the validation split held out"):
        tuning.check_settings(tuning.TuneConfig(score="eval"), {"validation_examples": 100})
    with pytest.raises(ConfigError, match="needs a validation split held out of the training data"):
        tuning.check_settings(tuning.TuneConfig(), {"validation_examples": None})


def test_cli_refuses_a_deterministic_k_in_one_line(run_cli):
    result = run_cli(
        "-m", "dpbench.tune", *TINY, f"paths.data_root={FIXTURE_DATA}", "tune.distribution=fixed", check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: tune.distribution=fixed is a deterministic number of trials: the bound of Papernot & Steinke "
        "(2022) needs a random, secret K; choose one of poisson, truncated_negative_binomial "
        "(e.g. tune.distribution=poisson tune.mu=4)"
    ]


def _seed_with_two_trials() -> int:
    count = tnb(1.0, 0.5)
    for seed in range(50):
        secret = PrivacyRandomness.seeded(seed, {"tune": TUNE_SETTINGS})
        if tune_module().draw_plan(secret, count, 2)[0] == 2:
            return seed
    raise AssertionError("no seed below 50 draws K = 2")


def tune_module():
    from dpbench import tune

    return tune


# cfg.tune after TUNE_OVERRIDES (what the seeded tuning randomness hashes).
TUNE_OVERRIDES = [
    "tune=truncated_negative_binomial",
    "tune.gamma=0.5",
    "tune.epsilon=20",
    "tune.score_noise=2",
]
TUNE_SETTINGS = {
    "distribution": "truncated_negative_binomial",
    "mu": 4.0,
    "eta": 1.0,
    "gamma": 0.5,
    "epsilon": 20.0,
    "score": "noisy_validation",
    "score_noise": 2.0,
}


def test_tuning_releases_the_best_noisy_score_and_accounts_the_total(tmp_path):
    tune = tune_module()
    seed = _seed_with_two_trials()
    base = [
        *TINY,
        f"paths.data_root={FIXTURE_DATA}",
        "dataset.validation_examples=32",
        "dp.randomness=seeded",
        f"runner.seed={seed}",
    ]
    jobs = [[*base, "optimizer.learning_rate=0.1"], [*base, "optimizer.learning_rate=1"]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("tune_config", overrides=[*base, *TUNE_OVERRIDES, f"paths.output_dir={tmp_path}"])
        result = tune.run_tuning(
            cfg,
            jobs,
            ["optimizer.learning_rate"],
            lambda o: compose("config", overrides=o),
            tmp_path,
            command="python -m dpbench.tune +sweep=this_test",
        )
    private = json.loads((tmp_path / tune.TRIALS_FILE).read_text())
    assert stat.S_IMODE((tmp_path / tune.TRIALS_FILE).stat().st_mode) == 0o600
    assert private["K"] == 2 and "K" not in result and not (tmp_path / "privacy_secret").exists()
    # Direct recomputation: the plan from the seeded secret, each score = exact count + noise, argmax.
    secret = PrivacyRandomness.seeded(seed, {"tune": TUNE_SETTINGS})
    k, chosen, noise = tune.draw_plan(secret, tnb(1.0, 0.5), 2)
    scores = []
    for index, trial in enumerate(private["trials"]):
        record = json.loads(
            (tmp_path / "trials" / tune.trial_folder_name(secret, index) / "results.json").read_text()
        )
        assert trial["candidate"] == chosen[index]
        assert record["config"]["optimizer"]["learning_rate"] == [0.1, 1.0][chosen[index]]
        correct = record["metrics"]["eval/accuracy"] * record["metrics"]["eval/examples"]
        scores.append((correct + 2.0 * noise[index]) / record["metrics"]["eval/examples"])
        assert record["noise_multiplier"] == result["noise_multiplier"]
        # A trial's record names what reruns it alone, not the tune command it ran inside.
        command = record["reproducibility"]["command"]
        assert command.startswith("python -m dpbench ") and "tune" not in command.split()[2:], command
        assert f"dp.noise_multiplier={result['noise_multiplier']!r}" in command, command
        assert f"optimizer.learning_rate={[0.1, 1][chosen[index]]}" in command, command
        assert record["epsilon"] == pytest.approx(result["epsilon_training"])
    best = int(np.argmax(scores))
    assert result["released"]["score"] == pytest.approx(scores[best])
    assert result["released"]["run_dir"] == private["trials"][best]["folder"]
    # The total: Theorem 2 on the trial's event composed with the score's Gaussian, at the trial's δ.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(result["noise_multiplier"])), 2
    )
    total = tuning.tuned_epsilon([event], 1e-5, tnb(1.0, 0.5), 2.0)
    assert result["epsilon_with_tuning"] == pytest.approx(total) and total <= 20.0
    assert result["epsilon_training"] < total

    from dpbench.report import load_runs, markdown

    loaded = load_runs([str(tmp_path / "trials")])
    text = markdown(loaded)
    assert "| ε (training) | ε (with tuning) |" in text
    released = [r for r in loaded if r.epsilon_with_tuning is not None]
    assert [r.path for r in released] == [result["released"]["run_dir"]]

    # The released trial, measured once on the test split (unread by the choice): its saved model
    # scored directly on the test images gives the released test accuracy.
    from omegaconf import OmegaConf

    from dpbench.data.registry import load_dataset
    from dpbench.models import saved as saved_lib

    folder = Path(result["released"]["run_dir"])
    record = json.loads((folder / "results.json").read_text())
    data_cfg = OmegaConf.create(record["config"]["dataset"])
    data_cfg.validation_examples = None
    test_split = load_dataset(data_cfg).eval
    model = saved_lib.load_model(folder / "model").bundle
    predicted = np.argmax(np.asarray(model.apply_fn(model.params, test_split)), -1)
    test = result["released"]["test_metrics"]
    assert test["split"] == "test" and test["eval/examples"] == len(test_split["label"]) == 16
    assert test["eval/accuracy"] == pytest.approx(float(np.mean(predicted == test_split["label"])))
    assert json.loads((tmp_path / tune.RECORD_FILE).read_text())["released"]["test_metrics"] == test
    assert "accuracy (test, released)" in markdown(loaded, ["method", "test:eval/accuracy"])

    # The publishable record of the released trial: the test metrics, no validation evaluations,
    # the total ε; the report reads it like any run and shows both ε.
    published = json.loads((tmp_path / tune.RELEASED_RECORD).read_text())
    assert published["metrics"]["eval/accuracy"] == test["eval/accuracy"] and published["history"] == []
    assert published["tuning"]["epsilon_with_tuning"] == result["epsilon_with_tuning"]
    assert published["epsilon"] == result["epsilon_training"]
    # Published, the model is reproduced by the whole tuning (its trial alone would skip the choice).
    assert published["reproducibility"]["command"] == "python -m dpbench.tune +sweep=this_test"
    (row,) = load_runs([str(tmp_path / "released")])
    assert row.epsilon_with_tuning == result["epsilon_with_tuning"]
    assert "| ε (training) | ε (with tuning) |" in markdown([row])
