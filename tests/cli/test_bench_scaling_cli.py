"""``python -m dpbench.bench.scaling --quick``: every (clipping, T) and (clipping, batch) row, numbers
derived from the raw measurements, the load bracket and busy flags, the clipping code's per-layer
routes, the plot; bad input is one line with status 2.

No timing assertions: the machine is shared.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from dpbench.bench import harness, jax_side, scaling, workloads
from dpbench.privacy import clipping

CLIPPING_LABELS = ("none (dp=none)", "per_example", "ghost", "bookkeeping")


def table_rows(text: str, heading: str) -> dict[tuple[str, int, str], list[str]]:
    """The rows of the table under ``heading``, as cells, by (fine-tuning, T or batch, clipping)."""
    section = text.split(heading, 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| fine-tuning", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[(cells[0], int(cells[1]), cells[2])] = cells
    return rows


def test_quick_run_has_every_clipping_row_with_ratios_from_the_measured_times(tmp_path, capsys):
    # LoRA only, to stay near a minute on a busy machine; the slow test below runs full fine-tuning too.
    assert scaling.main(["--quick", "--finetunes", "lora", "--log-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "bench_scaling.md").read_text()
    assert text in printed and "Command: `python -m dpbench.bench.scaling --quick" in text
    raw = json.loads((tmp_path / "bench_scaling.json").read_text())
    grid = scaling.QUICK_GRID
    check_tables(text, raw, ["lora"], grid)
    assert (tmp_path / "bench_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The routes are the clipping code's: LoRA factors see T positions, and the rule decides them.
    assert raw["auto_resolves_to"] == "bookkeeping"
    routes = raw["routes"]["lora"]
    assert sorted(int(t) for t in routes) == list(grid.seq_lens)
    for seq_len, by_param in routes.items():
        factors = {p: e for p, e in by_param.items() if p.endswith(("lora_a", "lora_b"))}
        assert len(factors) == 8  # query and value, A and B, 2 layers
        for entry in factors.values():
            assert entry["tokens"] == int(seq_len)
            expected = clipping.materialises(entry["tokens"], *entry["dims"])
            assert entry["route"] == ("materialised" if expected else "ghost")
    route_table = text.split("### Where the mixed rule", 1)[1]
    assert "| `encoder/layer_*/attention/query/lora_a` (2 layers) | 32 x 4 | T |" in route_table


def check_tables(text: str, raw: dict, finetunes: list[str], grid: scaling.Grid) -> None:
    by_seq = table_rows(text, "### Against sequence length T")
    by_batch = table_rows(text, "### Against batch size")
    assert len(by_seq) == len(finetunes) * len(grid.seq_lens) * len(CLIPPING_LABELS)
    assert len(by_batch) == len(finetunes) * len(grid.batch_sizes) * len(CLIPPING_LABELS)
    shapes = {(s["finetune"], s["seq_len"], s["batch_size"]): s for s in raw["shapes"]}
    cells = [(by_seq, f, t, (f, t, grid.seq_batch)) for f in finetunes for t in grid.seq_lens]
    cells += [(by_batch, f, b, (f, grid.batch_seq_len, b)) for f in finetunes for b in grid.batch_sizes]
    for table, finetune, value, key in cells:
        shape = shapes[key]
        medians = {
            m["variant"]: statistics.median(m["step_seconds"])
            for m in shape["measurements"]
            if m["step_seconds"]
        }
        assert set(medians) == set(scaling.VARIANT_IDS), shape["measurements"]
        for label, variant in zip(CLIPPING_LABELS, scaling.VARIANT_IDS, strict=True):
            row = table[(finetune, value, label)]
            seconds, ratio = float(row[3]), float(row[4].rstrip("x"))
            assert math.isfinite(seconds) and seconds > 0 and math.isfinite(ratio) and ratio > 0
            measured = medians[variant] / medians["dpbench-none"]
            assert seconds == pytest.approx(medians[variant], abs=5e-4)
            assert ratio == pytest.approx(measured, abs=5e-3)
            summary = next(r for r in shape["rows"] if r["variant"] == variant)
            assert summary["time_ratio"] == pytest.approx(measured)
            measurement = next(m for m in shape["measurements"] if m["variant"] == variant)
            before, after = measurement["load_before"], measurement["load_after"]
            assert before >= 0 and after >= 0
            cores = measurement["step_cpu_seconds"] and statistics.median(
                measurement["step_cpu_seconds"]
            ) / statistics.median(measurement["step_seconds"])
            busy = harness.machine_busy(before, after, cores or 0.0)
            assert row[-1].endswith(harness.BUSY_MARK) == busy, row
    if any(row[-1].endswith(harness.BUSY_MARK) for row in [*by_seq.values(), *by_batch.values()]):
        assert harness.busy_footnote() in text


def test_routes_follow_the_mixed_rule_as_T_grows():
    # tiny_encoder, full fine-tuning: the 32 x 64 feed-forward kernels change route between T=16 and 32.
    routes = jax_side.norm_routes(workloads.QUICK["d"], [16, 32])
    kernel = "encoder/layer_0/intermediate/kernel"
    assert [routes[t][kernel]["route"] for t in (16, 32)] == ["ghost", "materialised"]
    assert routes[16][kernel]["dims"] == [32, 64] and not clipping.materialises(16, 32, 64)
    assert routes[16]["encoder/embeddings/word_embeddings/embedding"] == {
        "route": "ghost",
        "taps": 1,
        "ids": True,
    }
    assert routes[16]["encoder/layer_0/attention_norm/scale"]["route"] == "diag"


def test_bad_arguments_are_one_line_errors(capsys):
    for argv, expected in (
        (["--finetunes", "head"], "choose from lora, full"),
        (["--seq-lens", "0,32"], "positive integers"),
        (["--batch-sizes", "eight"], "positive integers"),
        (["--rounds", "0"], "--rounds=0: give at least 1"),
        (["--quick", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ):
        assert scaling.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_quick_run_of_both_fine_tuning_modes(tmp_path):
    assert scaling.main(["--quick", "--log-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "bench_scaling.json").read_text())
    check_tables((tmp_path / "bench_scaling.md").read_text(), raw, ["lora", "full"], scaling.QUICK_GRID)
    assert set(raw["routes"]) == {"lora", "full"} and "error" not in raw["routes"]["full"]


def test_rounds_rotate_the_variants_within_each_shape():
    """Over as many rounds as variants, each variant is measured once in every position after a change
    of shape, every round measures every cell once, and a shape's cells stay together."""
    grid = scaling.FULL_GRID
    chosen = scaling.shapes(["lora", "full"], grid)
    variants = [scaling.BY_ID[i] for i in scaling.VARIANT_IDS]
    positions = {(s, v.id): set() for s in chosen for v in variants}
    every_cell = sorted((s.name, v.id) for s in chosen for v in variants)
    for r in range(len(variants)):
        order = scaling.round_order(chosen, variants, r)
        assert sorted((s.name, v.id) for s, v in order) == every_cell
        shapes_in_order = [s for s, _ in order]
        runs = [s for i, s in enumerate(shapes_in_order) if i == 0 or s != shapes_in_order[i - 1]]
        assert len(runs) == len(chosen)  # contiguous per shape
        for i, (s, v) in enumerate(order):
            positions[(s, v.id)].add(i % len(variants))
    assert all(p == set(range(len(variants))) for p in positions.values())
