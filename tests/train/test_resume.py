"""Checkpoints and resume in process: bit-identical continuation, refusals, skips, honest records."""

import logging

import pytest

from dpbench import config as config_lib
from dpbench import experiment, records
from dpbench.privacy import release
from dpbench.privacy.randomness import SECRET_FILE
from dpbench.train.checkpoint import Checkpoints
from dpbench.train.preemption import Preempted
from tests.helpers import TINY, compose_config

# 6 DP steps, evaluations at 2, 4 and 6; checkpoints only where required (before an evaluation,
# at the end, on a stop), so a stop at 3 or 5 resumes from exactly that step.
JOB = [
    *TINY,
    "runner.steps=6",
    "runner.eval_every=2",
    "runner.eval_before_training=true",
    "runner.checkpoint_every=0",
    "accountant=rdp",
]
TRAIN_STATISTICS = ("train/loss", "train/accuracy", "train/clipped_fraction", "train/grad_norm")


def _without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "train/examples_per_s"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return experiment.run(compose_config(JOB, out)), out


def test_a_resumed_run_is_bit_identical_across_evaluations(uninterrupted, tmp_path):
    reference, reference_dir = uninterrupted
    # The reference run's own secret: the same batches and noise (tests/privacy/test_randomness.py: resuming
    # with the run folder's own secret file).
    cfg = compose_config([*JOB, f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path)
    with pytest.raises(Preempted) as stopped:
        experiment.run(cfg, stop_after=2)  # an evaluation step: checkpoint, evaluate, stop
    assert stopped.value.step == 2 and stopped.value.exit_status == 143
    assert Checkpoints(tmp_path, keep=2).all_steps() == [2]
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=5)  # resumes at 2, stops between evaluations
    resumed = experiment.run(cfg)
    assert resumed["resumed_at"] == [2, 5]
    assert resumed["final_params_sha256"] == reference["final_params_sha256"]
    assert resumed["metrics"] == reference["metrics"] and resumed["history"] == reference["history"]
    assert resumed["baseline_metrics"] == reference["baseline_metrics"]
    assert resumed["epsilon"] == reference["epsilon"] and resumed["steps"] == 6
    # history.jsonl: the same lines in the same order, none repeated (timing aside).
    assert _without_timing(records.read_history(tmp_path)) == _without_timing(
        records.read_history(reference_dir)
    )


def test_a_resumed_record_counts_the_time_of_every_session(tmp_path, monkeypatch):
    """train_seconds and wall_seconds carry on from the checkpoint's, so a table of a resumed run
    shows what the whole run cost, not its last session."""
    cfg = compose_config(JOB, tmp_path)
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=3)
    saved = Checkpoints(tmp_path, keep=2).read_meta(3)
    assert saved["wall_seconds"] >= saved["train_seconds"] > 0
    read_meta = Checkpoints.read_meta  # as if the first session had taken 1000 s, 500 of them training
    monkeypatch.setattr(
        Checkpoints,
        "read_meta",
        lambda self, step: {**read_meta(self, step), "wall_seconds": 1e3, "train_seconds": 5e2},
    )
    resumed = experiment.run(cfg)
    assert resumed["resumed_at"] == [3]
    assert (
        1e3 < resumed["wall_seconds"] < 1e3 + 600 and 5e2 < resumed["train_seconds"] < resumed["wall_seconds"]
    )


def test_a_complete_run_is_skipped(uninterrupted, monkeypatch):
    _, out = uninterrupted
    before = (out / "results.json").read_text()
    monkeypatch.setattr(experiment, "build", lambda cfg: pytest.fail("a complete run must not be rebuilt"))
    # The record as it is, marked as a skipped job (what a sweep's summary counts).
    assert experiment.run(compose_config(JOB, out)) == {**records.load_record(out).to_dict(), "skipped": True}
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize(
    "change, named",
    [
        ("dp.epsilon=2", "dp.epsilon=2.0 (the checkpoint has dp.epsilon=1.0)"),
        ("dataset.max_train_examples=48", "dataset.max_train_examples=48"),
        ("runner.steps=8", "runner.steps=8"),
    ],
)
def test_resume_refuses_a_different_run_and_names_the_setting(tmp_path, change, named):
    with pytest.raises(Preempted):
        experiment.run(compose_config(JOB, tmp_path), stop_after=1)
    with pytest.raises(config_lib.ConfigError, match="runner.resume") as error:
        experiment.run(compose_config([*JOB, change], tmp_path))
    assert named in str(error.value) and "runner.resume=never" in str(error.value)


def test_resume_must_needs_a_checkpoint_and_never_starts_afresh(uninterrupted, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="runner.resume=must but .* holds no checkpoint"):
        experiment.run(compose_config([*JOB, "runner.resume=must"], tmp_path))
    reference, out = uninterrupted
    again = experiment.run(
        compose_config(
            [*JOB, "runner.resume=never", f"dp.secret_file={out / SECRET_FILE}"], tmp_path / "fresh"
        )
    )
    assert again["resumed_at"] == [] and again["final_params_sha256"] == reference["final_params_sha256"]


def test_a_dp_run_publishes_no_training_statistics_by_default(uninterrupted):
    reference, out = uninterrupted
    assert reference["privacy"]["released_nonprivate_statistics"] == []
    published = (out / "results.json").read_text() + (out / "history.jsonl").read_text()
    for name in (*TRAIN_STATISTICS, "logical_batch_size", "train_class_counts", "nonfinite"):
        assert name not in published
    train_lines = [line for line in records.read_history(out) if line["kind"] == "train"]
    assert {key for line in train_lines for key in line} == {
        "kind",
        "step",
        "privacy/sigma",
        "privacy/epsilon",
    }
    assert "examples_per_s" not in published  # grows with the realised batch size: withheld
    assert reference["reproducibility"]["privacy_randomness"] == "secret"


def test_opting_in_releases_them_and_the_privacy_section_says_so(tmp_path):
    run = experiment.run(
        compose_config([*JOB, "runner.steps=2", "runner.release_nonprivate_stats=true"], tmp_path)
    )
    released = run["privacy"]["released_nonprivate_statistics"]
    assert set(TRAIN_STATISTICS) | {
        "train/logical_batch_size",
        "train/examples_per_s",
        "dataset_info.train_class_counts",
    } <= set(released)
    assert run["dataset_info"]["train_class_counts"]
    train = [line for line in records.read_history(tmp_path) if line["kind"] == "train"]
    assert all("train/loss" in line and "train/logical_batch_size" in line for line in train)


def test_a_nonprivate_run_logs_everything(tmp_path):
    run = experiment.run(compose_config([*JOB, "dp=none", "runner.steps=2"], tmp_path))
    assert run["privacy"] == {"mechanism": "none (non-private)"} and run["dataset_info"]["train_class_counts"]
    train = [line for line in records.read_history(tmp_path) if line["kind"] == "train"]
    assert all("train/loss" in line and "train/accuracy" in line for line in train)


def test_nonfinite_counts_are_withheld_and_the_log_says_only_that_some_were_zeroed(caplog):
    policy = release.ReleasePolicy(private=True, opted_in=False)
    with caplog.at_level(logging.WARNING, logger="dpbench"):
        assert policy.train_record({"count": 10.0, "loss_sum": 3.0, "nonfinite_sum": 2.0}) == {}
        assert policy.train_record({"count": 9.0, "loss_sum": 3.0, "nonfinite_sum": 1.0}) == {}
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and not any(char.isdigit() for char in warnings[0])
    assert policy.released == set()
    opted_in = release.ReleasePolicy(private=True, opted_in=True)
    record = opted_in.train_record({"count": 10.0, "loss_sum": 3.0, "nonfinite_sum": 2.0})
    assert record["train/nonfinite_examples"] == 2.0 and record["train/loss"] == pytest.approx(0.3)
    assert {"train/nonfinite_examples", "train/loss", "train/logical_batch_size"} <= opted_in.released
