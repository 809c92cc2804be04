"""The conformance matrix: model x clipping x mesh x dtype x remat x noise x unit x randomness, through
the real config.

Every cell the config accepts must give (tests/privacy/conformance_check.py, 4 fake CPU devices):
- the clipped sum of the 1-device float32 per-example implementation (float32: to 1e-4 relative;
  bfloat16: to 5e-2, the model itself rounds);
- a remove-one sensitivity <= C (every example clipped, so the bound is tight), up to float32 rounding;
  with ``dp.unit=user``, removing one user (all their rows: each user's mean gradient is clipped);
- noise of standard deviation σC on the sum (correlated noise: σC times the norm of the row of C⁻¹,
  over the first two steps), drawn once: the same numbers on every mesh as on one device for the
  same key and mechanism, in both randomness modes.
Every cell the config refuses must say why in one line that names a setting.

A new path (a model, a clipping implementation, a mesh axis, a dtype) gets its row here. The fast
subset runs in ``make test``; the full matrix is ``slow``.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import once_per_session, run_cli

SCRIPT = Path(__file__).with_name("conformance_check.py")
MODELS = (
    "cnn",
    "cnn_tanh",
    "encoder_lora",
    "encoder_ffa",
    "encoder_full",
    "gemma_lora",
    "gemma_full",
    "gemma_nf4",  # model.frozen_quantization=nf4: the frozen base stored as 4-bit codes
)
CLIPPINGS = ("per_example", "ghost", "bookkeeping")
MESHES = ("1", "d2", "f2", "d2f2")


def _cells() -> list[str]:
    cells = []
    for model, clipping, mesh in itertools.product(MODELS, CLIPPINGS, MESHES):
        dtypes = ("float32",) if model.startswith("cnn") else ("float32", "bfloat16")
        remats = ("none", "full") if model.startswith("gemma") else ("none",)
        cells += [f"{model}:{clipping}:{mesh}:{d}:{r}" for d, r in itertools.product(dtypes, remats)]
    # Correlated noise (BandMF, BLT) on every model and mesh, with the clipping every preset uses.
    for model, mesh, noise in itertools.product(MODELS, MESHES, ("bandmf", "blt")):
        if model != "encoder_ffa":  # dp=ffa is a method of its own, with i.i.d. noise
            cells.append(f"{model}:bookkeeping:{mesh}:float32:none:{noise}")
    # User-level DP (dp.unit=user): every model and clipping on one device and on data x fsdp.
    for model, clipping, mesh in itertools.product(MODELS, CLIPPINGS, ("1", "d2f2")):
        if model != "encoder_ffa":
            cells.append(f"{model}:{clipping}:{mesh}:float32:none:iid:user")
    return cells


FULL = _cells()
# The fast subset: each model once, every clipping, every mesh axis, both dtypes, remat, the known
# refusal (ghost in bfloat16), and the CNN on fsdp (where XLA's partitioner once got it wrong).
FAST = [
    "cnn:per_example:d2f2:float32:none",
    "cnn:bookkeeping:f2:float32:none",
    "cnn_tanh:ghost:d2:float32:none",
    "encoder_ffa:bookkeeping:d2f2:float32:none",
    "encoder_full:per_example:f2:bfloat16:none",
    "gemma_lora:bookkeeping:d2f2:bfloat16:full",
    "gemma_lora:ghost:1:bfloat16:none",
    "gemma_full:ghost:f2:float32:none",
    "gemma_nf4:bookkeeping:d2f2:bfloat16:full",  # quantized base, FSDP-gathered codes, remat
    "cnn:bookkeeping:d2f2:float32:none:bandmf",
    "encoder_lora:ghost:f2:float32:none:blt",
    "cnn:per_example:d2f2:float32:none:iid:user",
    # The encoder's users once measured 1.00025 C under ghost and book-keeping (cross-term norms).
    "encoder_full:bookkeeping:1:float32:none:iid:user",
    "encoder_full:ghost:d2f2:float32:none:iid:user",
]


def run_cells(cells: list[str]) -> dict:
    proc = run_cli(SCRIPT, *cells, timeout=5400)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("CONFORMANCE "))
    return json.loads(line.removeprefix("CONFORMANCE "))


def check_cell(cell: str, result: dict) -> None:
    if "refused" in result:
        message = result["refused"]
        assert "\n" not in message and ("dp.clipping" in message or "compute." in message), (cell, message)
        return
    parts = cell.split(":")
    dtype, noise_kind = parts[3], (parts[5] if len(parts) > 5 else "iid")
    assert result["noise_kind"] == noise_kind, (cell, result)
    users = parts[6:] == ["user"]
    assert result["unit_size"] == (2 if users else 1), (cell, result)
    # The sum is not small against its terms (users: the error is measured against U·C instead).
    assert result["count"] == 8 and (users or result["sum_norm_over_c"] > 1.0), (cell, result)
    assert result["sum_error"] <= (1e-4 if dtype == "float32" else 5e-2), (cell, result)
    assert result["sensitivity"] <= 1 + 1e-4, (cell, result)
    for mode, noise in result["noise"].items():
        tolerance = 5 / np.sqrt(2 * noise["size"])  # 5 standard errors of a sample std
        expected = noise["expected_std_ratio"]
        if noise_kind == "iid":
            assert expected == [1.0, 1.0], (cell, noise)
        for step, (std, want, mean) in enumerate(zip(noise["std_ratio"], expected, noise["mean_ratio"])):
            assert abs(std / want - 1) <= tolerance, (cell, mode, step, noise)
            assert abs(mean) <= 5 * want / np.sqrt(noise["size"]), (cell, mode, step, noise)
        # Drawn once from one key: the same noise on this mesh as on one device (float32 sums).
        assert noise["max_diff_to_one_device"] <= 1e-5, (cell, mode, noise)


def _expected_refusal(cell: str) -> bool:
    """Ghost in bfloat16: its second backward pass rounds in the model's dtype."""
    _, clipping, _, dtype, *_ = cell.split(":")
    return clipping == "ghost" and dtype == "bfloat16"


@pytest.fixture(scope="session")
def fast_results(tmp_path_factory):
    return once_per_session(tmp_path_factory, "conformance_fast", lambda: run_cells(FAST))


# The fast cells share one subprocess (a module fixture): one xdist worker runs them all
# (`--dist loadgroup` in the Makefile), instead of each worker running the whole subset.
@pytest.mark.xdist_group("conformance_fast")
@pytest.mark.parametrize("cell", FAST)
def test_fast_cell(fast_results, cell):
    result = fast_results[cell]
    assert ("refused" in result) == _expected_refusal(cell), (cell, result)
    check_cell(cell, result)


@pytest.mark.xdist_group("conformance_fast")
def test_ghost_in_bfloat16_is_refused_naming_bookkeeping(fast_results):
    message = fast_results["gemma_lora:ghost:1:bfloat16:none"]["refused"]
    assert "bookkeeping" in message and "\n" not in message


@pytest.mark.slow  # about 270 cells, two builds each: one model's cells per subprocess (5-15 min)
@pytest.mark.parametrize("model", MODELS)
def test_full_matrix(model):
    cells = [cell for cell in FULL if cell.split(":")[0] == model]
    results = run_cells(cells)
    assert set(results) == set(cells)
    refused = sorted(cell for cell, result in results.items() if "refused" in result)
    assert refused == sorted(cell for cell in cells if _expected_refusal(cell))
    for cell, result in results.items():
        check_cell(cell, result)


def test_the_full_matrix_covers_every_model_and_the_fast_models():
    models = {cell.split(":")[0] for cell in FULL}
    assert models == set(MODELS) and {cell.split(":")[0] for cell in FAST} <= models
