"""Data parallelism over 4 fake CPU devices gives the single-device result, noise included, with
every clipping implementation (per_example, ghost, bookkeeping)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fake_devices, once_per_session, run_cli

# One worker runs this module: its tests share one expensive session fixture (once_per_session).
pytestmark = pytest.mark.xdist_group("data_parallel")

SIGMA, CLIP = 1.1, 0.5


@pytest.fixture(scope="session")
def result(tmp_path_factory):
    env = {"XLA_FLAGS": fake_devices(4)}
    script = Path(__file__).with_name("data_parallel_check.py")
    run = lambda: json.loads(run_cli(script, env=env).stdout)  # noqa: E731
    return once_per_session(tmp_path_factory, "data_parallel", run)


@pytest.mark.parametrize("four", ["4", "4_ghost", "4_bookkeeping"])
def test_clipped_sum_is_the_same_on_one_and_four_devices(result, four):
    for a, b in zip(result["sum_1"], result[f"sum_{four}"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(np.concatenate(result["sum_1"])).max() > 0


def test_noise_std_is_sigma_c_not_scaled_by_device_count(result):
    for devices in ("1", "4", "4_ghost"):
        # ~100k draws: the sample std is within 1% of σC with overwhelming probability.
        assert result[f"noise_size_{devices}"] > 50_000
        assert result[f"noise_std_{devices}"] == pytest.approx(SIGMA * CLIP, rel=0.01)


@pytest.mark.parametrize("four", ["4", "4_ghost", "4_bookkeeping"])
def test_parameters_after_noisy_steps_match(result, four):
    for a, b in zip(result["params_1"], result[f"params_{four}"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
