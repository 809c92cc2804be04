"""``python -m dpbench.privacy``: the privacy plan of a run, from the same config, without training."""

import re

import pytest

from dpbench.privacy import accounting
from dpbench.privacy.batch_selection import PoissonSampler
from tests.helpers import FULL_DATA, needs_shared_data, run_cli

MNIST_TRAIN = 60_000


def _plan(tmp_path, *overrides: str) -> dict[str, str]:
    """Run the CLI; its table as {setting: value} (Hydra's "[time][logger][LEVEL]" log lines skipped)."""
    done = run_cli(
        "-m",
        "dpbench.privacy",
        f"paths.data_root={FULL_DATA}",
        f"hydra.run.dir={tmp_path}",
        "hydra.output_subdir=null",
        *overrides,
        timeout=300,
    )
    rows = [line.split("  ", 1) for line in done.stdout.strip().splitlines() if not line.startswith("[")]
    return {name.strip(): value.strip() for name, value in rows}


@needs_shared_data("mnist")
def test_mnist_cnn_plan_calibrates_the_published_sigma(tmp_path):
    plan = _plan(tmp_path, "+experiment=mnist_cnn")
    assert plan["training examples n"] == str(MNIST_TRAIN)
    assert plan["logical steps"] == "5000"
    assert float(plan["sampling rate q"]) == pytest.approx(256 / MNIST_TRAIN, rel=1e-5)
    assert float(plan["δ"]) == 1e-5
    assert float(plan["σ (noise multiplier)"].split()[0]) == pytest.approx(1.337, abs=2e-3)
    assert 0.99 < float(plan["ε"]) <= 1.0  # calibrated σ spends at most the target
    assert plan["accountant"].startswith("pld")


@needs_shared_data("mnist")
def test_given_sigma_prints_the_accountants_epsilon(tmp_path):
    plan = _plan(tmp_path, "+experiment=mnist_cnn", "dp.epsilon=null", "dp.noise_multiplier=1.1")
    sampler = PoissonSampler(MNIST_TRAIN, expected_batch_size=256, seed=0)
    expected = accounting.compute_epsilon(sampler, 1.1, 5000, 1e-5, accounting.AccountantConfig(name="pld"))
    assert float(plan["ε"]) == pytest.approx(expected, abs=2e-6)  # printed with 6 decimals
    assert plan["σ (noise multiplier)"].startswith("1.100000 given")


@needs_shared_data("mnist")
def test_canary_audit_and_nonprivate_runs_are_planned_honestly(tmp_path):
    plan = _plan(tmp_path, "+experiment=mnist_cnn_nonprivate", "audit=canary", "audit.num_canaries=100")
    # The included canaries are training examples too, so n (and q) grow.
    n = int(plan["training examples n"])
    assert MNIST_TRAIN < n < MNIST_TRAIN + 100
    assert float(plan["sampling rate q"]) == pytest.approx(256 / n, rel=1e-5)
    assert "ε" not in plan and plan["privacy"].startswith("none")


def test_n_without_any_data(tmp_path):
    """+plan.num_examples gives n: the plan of a run whose data this machine does not have."""
    plan = _plan(
        tmp_path,
        "+experiment=mnist_cnn",
        "paths.data_root=/no/such/folder",
        f"+plan.num_examples={MNIST_TRAIN}",
    )
    assert plan["training examples n"] == str(MNIST_TRAIN)
    assert float(plan["σ (noise multiplier)"].split()[0]) == pytest.approx(1.337, abs=2e-3)
    # i.i.d. noise: σC/B at each step, √steps times that in the running sum at the last step.
    per_step = float(plan["σ (noise multiplier)"].split()[0]) * 0.1 / 256  # clip norm 0.1, batch 256
    numbers = re.findall(r"[0-9.]+(?:e-?[0-9]+)?", plan["noise std on the mean gradient"])
    step, running_rms, last = (float(x) for x in numbers)
    assert step == pytest.approx(per_step, rel=1e-3)
    assert last == pytest.approx(per_step * 5000**0.5, rel=1e-3)
    assert running_rms == pytest.approx(per_step * (5001 / 2) ** 0.5, rel=1e-3)  # RMS of √t over t ≤ 5000


def test_adaptive_clipping_states_its_noise_at_the_initial_c(tmp_path):
    plan = _plan(
        tmp_path,
        "+experiment=mnist_cnn",
        f"+plan.num_examples={MNIST_TRAIN}",
        "dp.adaptive_clip.target_quantile=0.5",
    )
    assert plan["noise std on the mean gradient"].endswith(", at the initial C")
