"""``python -m dpbench.bench``: the harness runs end to end on tiny models and writes a well-formed table.

No timing assertions: the machine is shared. What is checked is the structure (one row per
variant, numbers where numbers belong, baselines at 1.00x), that every framework trains the same
number of parameters (the same architecture), and the target verdicts' arithmetic.
"""

from __future__ import annotations

import json
import re

import pytest

from dpbench.bench import __main__ as bench_main
from dpbench.bench import harness, workloads
from dpbench.bench.variants import BY_ID

ROW = re.compile(
    r"^\| (?P<label>[^|]+) \| (?P<seconds>[\d.]+) \| (?P<range>[\d.]+-[\d.]+ \(\d+\)) \| "
    r"(?P<ratio>[\d.]+x) \| (?P<cpu>[\d.]+) \| (?P<cpu_ratio>[\d.]+x) \| "
    r"(?P<rss>\d+) MB \| (?P<mem_ratio>[\d.]+x) \| (?P<steps_rss>\d+) MB \| "
    r"(?P<steps_mem_ratio>[\d.]+x) \| (?P<params>[\d,]+) \| "
    r"(?P<load_low>[\d.]+)-(?P<load_high>[\d.]+)(?P<busy> †)? \|$"
)


def table_rows(text: str, workload_key: str) -> dict[str, re.Match]:
    """The rows of one workload's table, by label."""
    section = text.split(f"### ({workload_key})", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| variant", "| target")):
            match = ROW.match(line)
            if match:
                rows[match["label"].strip()] = match
    return rows


def run_bench(tmp_path, args: list[str]) -> str:
    output = tmp_path / "bench.md"
    code = bench_main.main(["--quick", "--output", str(output), "--log-dir", str(tmp_path / "logs"), *args])
    assert code == 0
    return output.read_text()


def test_quick_bench_writes_a_well_formed_table(tmp_path):
    # One JAX and one torch subprocess (every variant on every workload: the slow test below).
    variants = ["dpbench-none", "torch-nonprivate"]
    text = run_bench(tmp_path, ["--workloads", "a", "--variants", ",".join(variants)])
    assert text.startswith("# Head-to-head")
    assert harness.markers("a")[0] in text and harness.markers("a")[1] in text
    assert "Command: `python -m dpbench.bench --quick" in text
    assert re.search(r"load average \(1, 5, 15 min\) before [\d.]+, [\d.]+, [\d.]+, after", text)
    rows = table_rows(text, "a")
    assert len(rows) == 2, text
    assert all(m["ratio"] == m["cpu_ratio"] == m["mem_ratio"] == "1.00x" for m in rows.values())
    assert all(m["steps_mem_ratio"] == "1.00x" for m in rows.values())
    for match in rows.values():
        assert float(match["seconds"]) > 0 and float(match["cpu"]) > 0 and int(match["rss"]) > 100
        assert 0 < int(match["steps_rss"]) <= int(match["rss"])  # the steps' peak is part of the process's
        assert float(match["load_low"]) <= float(match["load_high"])
    # Same architecture in both frameworks: the tutorial CNN's 824,458 parameters.
    assert {m["params"] for m in rows.values()} == {"824,458"}
    assert "| all | no dpbench DP and non-private measurement | not measured |" in text
    # The raw measurements are kept beside the logs (the load around each subprocess too), and give
    # the same tables again.
    raw = json.loads((tmp_path / "logs" / "raw.json").read_text())["a"]
    assert all(m["load_before"] >= 0 and m["load_after"] >= 0 for m in raw)
    again = tmp_path / "again.md"
    assert bench_main.main(["--rerender", str(tmp_path / "logs"), "--output", str(again)]) == 0
    assert again.read_text() == text


def test_regenerating_replaces_only_its_workloads_block(tmp_path):
    path = tmp_path / "bench.md"
    block = lambda key, body: "\n".join([harness.markers(key)[0], body, harness.markers(key)[1]])  # noqa: E731
    harness.write_report(path, {"c": block("c", "old c")}, "title")
    path.write_text(path.read_text() + "\n## Notes\nhand-written analysis\n")
    harness.write_report(path, {"a": block("a", "new a"), "c": block("c", "new c")}, "title")
    harness.write_report(path, {"d": block("d", "new d")}, "title")
    text = path.read_text()
    assert text.startswith("# title")
    assert "old c" not in text and "hand-written analysis" in text
    assert text.index("new a") < text.index("new c") < text.index("hand-written") < text.index("new d")


def _row(variant_id: str, seconds: float, rss: float) -> harness.Row:
    return harness.Row(BY_ID[variant_id], variant_id, seconds=seconds, peak_rss_mb=rss, seconds_range=(0, 0))


def test_target_verdicts():
    variants = [BY_ID[i] for i in ("dpbench-none", "dpbench-per_example", "dpbench-ghost", "opacus-ghost")]
    measured = {"dpbench-none": (1.0, 1000), "dpbench-per_example": (3.0, 2000), "dpbench-ghost": (2.5, 1300)}
    measured["opacus-ghost"] = (2.0, 900)
    rows = [_row(v.id, *measured[v.id]) for v in variants] + [_row("torch-nonprivate", 1.0, 800)]
    ms = [
        harness.Measurement(r.variant.id, 0, step_seconds=[r.seconds], peak_rss_mb=r.peak_rss_mb, info={})
        for r in rows
    ]
    rows = harness.summarise([r.variant for r in rows], ms, {}, {})
    verdicts = {t: (m, v) for t, m, v in harness.evaluate_targets("d", rows)}
    assert verdicts["DP / non-private time <= 1.5x"] == ("2.50x (`ghost`)", "missed by 1.67x")
    assert verdicts["best dpbench DP step <= Opacus ghost"][1] == "missed by 1.25x"
    assert verdicts["DP peak RSS / non-private <= 1.2x"][1] == "missed by 8.3%"
    assert [v for t, m, v in harness.evaluate_targets("a", rows)][0] == "missed by 1.25x"


def test_target_verdicts_are_on_the_dp_sgd_rows():
    """A faster correlated-noise row (another mechanism, with its noise buffers) is not the DP-SGD step
    the targets are about: the verdicts stay on the fastest i.i.d. row."""
    measured = {"dpbench-none": (1.0, 1000), "dpbench-bookkeeping": (1.25, 1050)}
    measured["dpbench-bandmf"] = (1.2, 1900)
    ms = [
        harness.Measurement(v, 0, step_seconds=[sec], peak_rss_mb=rss, info={})
        for v, (sec, rss) in measured.items()
    ]
    rows = harness.summarise([BY_ID[v] for v in measured], ms, {}, {})
    verdicts = {t: (m, v) for t, m, v in harness.evaluate_targets("d", rows)}
    assert verdicts["DP / non-private time <= 1.5x"] == ("1.25x (`bookkeeping`)", "met")
    assert verdicts["DP peak RSS / non-private <= 1.2x"] == ("1.05x (`bookkeeping`: 1050 vs 1000 MB)", "met")


def test_busy_rounds_are_flagged_with_a_footnote(monkeypatch):
    """Load minus the measured process's own cores, against 0.75 x cores (4 cores here: 3.0)."""
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 4)
    assert not harness.machine_busy(2.9, 2.9) and harness.machine_busy(0.5, 3.1)
    assert not harness.machine_busy(3.5, 3.9, own_cores=1.0)  # the bench's own threads are not "busy"
    assert harness.machine_busy(None, 4.5, own_cores=1.0) and not harness.machine_busy(None, None)

    def measured(variant, load_before, load_after, round_=0):
        m = harness.Measurement(
            variant, round_, step_seconds=[1.0], step_cpu_seconds=[1.0], peak_rss_mb=100.0
        )
        m.load_before, m.load_after = load_before, load_after
        return m

    quiet_then_busy = [measured("dpbench-none", 0.2, 0.9), measured("dpbench-none", 1.0, 4.5, 1)]
    rows = harness.summarise(
        [BY_ID["dpbench-none"], BY_ID["dpbench-ghost"]],
        [*quiet_then_busy, measured("dpbench-ghost", 0.3, 1.2)],
        {},
        {},
    )
    assert [(r.busy_rounds, r.load_range) for r in rows] == [(1, (0.2, 4.5)), (0, (0.3, 1.2))]
    table = harness.render_table(rows)
    assert "| 0.20-4.50 † |" in table and "| 0.30-1.20 |" in table
    assert table.endswith(harness.busy_footnote()) and "0.75 x 4 cores = 3" in table
    quiet = harness.render_table(
        harness.summarise([BY_ID["dpbench-ghost"]], [measured("dpbench-ghost", 0.1, 0.2)], {}, {})
    )
    assert harness.BUSY_MARK not in quiet


def test_failed_and_missing_variants_are_reported_not_fatal(tmp_path):
    rows = harness.summarise(
        [BY_ID["dpbench-none"], BY_ID["opacus-ghost"]],
        [harness.Measurement("dpbench-none", 0, error="RuntimeError: boom")],
        {"opacus": "1.6.0"},
        {"opacus-ghost": "`opacus` is not installed"},
    )
    table = harness.render_table(rows)
    assert "failed: RuntimeError: boom" in table
    assert "`opacus` is not installed" in table


def test_torch_decoder_dims_are_dpbench_presets():
    from dpbench.models.gemma3 import PRESETS

    for dims, preset in ((workloads.GEMMA3_270M_DIMS, "270m"), (workloads.GEMMA3_TINY_DIMS, "tiny")):
        config = PRESETS[preset]
        assert dims == {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "sliding_window": config.sliding_window,
        }


def test_bad_arguments_name_the_allowed_values(capsys):
    assert bench_main.main(["--workloads", "z"]) == 2
    assert "choose from a, b, c, d" in capsys.readouterr().err
    assert bench_main.main(["--variants", "opacus-magic"]) == 2
    assert "opacus-ghost" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_bench_every_variant_every_workload(tmp_path):
    """All nine variants on the four tiny workloads: no failure, same trainable parameters per workload."""
    pytest.importorskip("opacus")
    pytest.importorskip("jax_privacy")
    text = run_bench(tmp_path, [])
    for key in "abcd":
        rows = table_rows(text, key)
        assert len(rows) == len(BY_ID), (key, text)
        assert len({m["params"] for m in rows.values()}) == 1, (key, text)
