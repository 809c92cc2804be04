"""The thin experiment: build -> Experiment, train_and_evaluate -> RunRecord, records on disk, errors."""

import ast
import json
import os
from pathlib import Path

import pytest

from dpbench import config as config_lib
from dpbench import experiment, records
from tests.helpers import REPO, TINY, compose_config, run_cli

TINY_EVAL = [*TINY, "runner.steps=4", "runner.eval_every=2", "runner.eval_before_training=true"]


@pytest.fixture(scope="module")
def tiny_dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_dp")
    exp = experiment.build(compose_config([*TINY_EVAL, "accountant=rdp"], out))
    return exp, experiment.train_and_evaluate(exp), out


def test_build_wires_every_part_from_the_config(tiny_dp_run):
    exp, _, _ = tiny_dp_run
    assert exp.task.name == exp.cfg.dataset.task == "classification"
    assert exp.method.name == "vanilla" and exp.private
    assert exp.mechanism.steps == 4 and exp.mechanism.noise_multiplier > 0
    assert exp.mechanism.sampler.num_examples == len(exp.train_arrays["label"]) == 64
    assert exp.trainer.expected_batch_size == 16


def test_build_holds_the_weights_once(tmp_path):
    """After build the trainer's state holds the trainable parameters and ``exp.frozen`` the rest;
    the bundle's own tree is dropped, so no second copy of any weight stays alive."""
    import gc

    import jax
    import numpy as np

    def alive(shape, dtype) -> int:
        gc.collect()
        return sum(1 for x in jax.live_arrays() if x.shape == shape and x.dtype == dtype)

    cfg = compose_config([*TINY, "model=tiny_encoder", "model.finetune=full", "dataset=sst2_rt"], tmp_path)
    embedding = (259, 32)  # tiny_encoder's word embedding, trained (full fine-tuning)
    before = alive(embedding, np.float32)
    exp = experiment.build(cfg)
    assert exp.model.params is None
    held = jax.tree_util.tree_leaves((exp.state.trainable, exp.state.opt_state, exp.frozen))
    expected = sum(1 for x in held if x.shape == embedding)
    assert expected >= 1
    assert alive(embedding, np.float32) - before == expected


def test_record_is_typed_versioned_and_complete(tiny_dp_run):
    _, record, out = tiny_dp_run
    assert isinstance(record, records.RunRecord)
    saved = records.load_record(out)
    assert saved == records.RunRecord.from_dict(json.loads((out / "results.json").read_text()))
    assert saved.schema_version == records.SCHEMA_VERSION and saved.complete
    assert saved.task == "classification" and saved.steps == 4
    assert [h["step"] for h in saved.history] == [2, 4]
    # The privacy spent to reach each evaluation stands beside it; the final metrics are the model's.
    assert saved.metrics == {
        k: v for k, v in saved.history[-1].items() if k != "step" and not k.startswith("privacy/")
    }
    assert saved.history[-1]["privacy/epsilon"] == pytest.approx(saved.epsilon)
    assert saved.history[-1]["privacy/delta"] == saved.delta
    assert saved.baseline_metrics is not None and "eval/accuracy" in saved.baseline_metrics
    assert len(saved.final_params_sha256) == 64
    assert 0 < saved.epsilon <= 1.0
    assert not list(out.glob(".*tmp*")), "no temporary file is left behind"


def test_history_has_one_line_per_logged_step_and_evaluation(tiny_dp_run):
    _, record, out = tiny_dp_run
    lines = records.read_history(out)
    assert [(line["kind"], line["step"]) for line in lines] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 4),
        ("eval", 4),
    ]
    evals = [{k: v for k, v in line.items() if k != "kind"} for line in lines if line["kind"] == "eval"]
    assert evals[1:] == record.history


def test_unversioned_records_still_load(tmp_path):
    legacy = {"dataset": "MNIST", "data_source": "idx:x", "weights_source": "random init", "method": "none"}
    legacy.update(metrics={"eval/accuracy": 0.9}, steps=3, sampling_rate=0.1, train_examples=10)
    legacy.update(epsilon=None, delta=None, noise_multiplier=None, privacy={}, config={})
    (tmp_path / "results.json").write_text(json.dumps(legacy))
    record = records.load_record(tmp_path)
    assert record.schema_version == 0 and record.task == "classification" and record.steps == 3
    (tmp_path / "results.json").write_text(json.dumps({**legacy, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version=99"):
        records.load_record(tmp_path)


def test_results_are_written_atomically(tmp_path, monkeypatch):
    path = records.write_json_atomic(tmp_path / "results.json", {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        records.write_json_atomic(path, {"a": 2, "b": Unserialisable()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    # A crash between writing and renaming leaves the previous record in place.
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        records.write_json_atomic(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 1}


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.name=lion", "optimizer.name='lion' is not allowed; choose one of sgd, adam, adamw"),
        ("logger.name=mlflow", "logger.name='mlflow' is not allowed; choose one of wandb, none"),
        ("dataset.task=regression", "dataset.task='regression' is not allowed; choose one of classification"),
    ],
)
def test_registries_name_the_allowed_options(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_static(compose_config([override]))


def _cli(*args, env=None):
    return run_cli("-m", "dpbench", *args, env=env, timeout=300, check=False)


def test_a_bad_setting_is_one_line_and_status_2(tmp_path):
    done = _cli("dp.epsilon=-1", "logger=none", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: dp.epsilon=-1.0 must be > 0"]
    full = _cli("dp.epsilon=-1", "logger=none", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert (
        full.returncode != 0 and "Traceback" in full.stderr and "dp.epsilon=-1.0 must be > 0" in full.stderr
    )


def test_an_unknown_override_is_status_2(tmp_path):
    done = _cli("runner.no_such_setting=1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "no_such_setting" in done.stderr and "Traceback" not in done.stderr


def _dpbench_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpbench"):
            # Imports under `if TYPE_CHECKING:` are for annotations only; they do not run.
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("dpbench"))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    guarded.add(inner.module)
    return names - guarded


def test_train_never_imports_privacy():
    """privacy hands train a gradient method; train must not import privacy back (no cycle)."""
    for path in (REPO / "dpbench" / "train").glob("*.py"):
        offending = {name for name in _dpbench_imports(path) if name.startswith("dpbench.privacy")}
        assert not offending, f"{path.name} imports {offending}"


def test_privacy_never_imports_models():
    """A DP method names parameter labels as plain strings; it never looks inside (or imports) a model."""
    for path in (REPO / "dpbench" / "privacy").glob("*.py"):
        offending = {name for name in _dpbench_imports(path) if name.startswith("dpbench.models")}
        assert not offending, f"{path.name} imports {offending}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dp.clip_norm=inf"], r"dp.clip_norm=inf is not allowed; choose a finite number > 0"),
        (["dp.epsilon=inf"], r"dp.epsilon=inf is not allowed; choose a finite number > 0 \(dp=none"),
        (["dp.epsilon=nan"], r"dp.epsilon=nan is not allowed"),
        (["dp.epsilon=null", "dp.noise_multiplier=inf"], r"dp.noise_multiplier=inf is not allowed"),
        (["dp.delta=nan"], r"dp.delta=nan is not allowed; choose a number in \(0, 1\)"),
        (
            ["optimizer.learning_rate=inf"],
            r"optimizer.learning_rate=inf is not allowed; choose a finite number",
        ),
        (["optimizer.b1=-inf"], r"optimizer.b1=-inf is not allowed"),
        (["accountant.value_discretization_interval=nan"], "accountant.value_discretization_interval=nan"),
        (["accountant=rdp", "accountant.orders=[2.0,inf]"], r"accountant.orders\[1\]=inf is not allowed"),
        (["runner.steps=null", "runner.epochs=inf"], r"runner.epochs=inf is not allowed"),
        (["audit.confidence=nan"], "audit.confidence=nan is not allowed"),
        (
            ["runner.resume=sometimes"],
            "runner.resume='sometimes' is not allowed; choose one of auto, never, must",
        ),
        (["runner.checkpoint_every=-1"], "runner.checkpoint_every=-1 must be >= 0"),
        (["runner.keep_checkpoints=0"], "runner.keep_checkpoints=0 must be >= 1"),
    ],
)
def test_non_finite_and_bad_runner_settings_stop_before_any_work(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_static(compose_config(overrides))


def test_epochs_giving_no_step_name_runner_epochs():
    from dpbench.privacy.mechanism import plan_mechanism

    for dp in ("dp=vanilla", "dp=none"):
        cfg = compose_config([dp, "dp.epsilon=null", "dp.noise_multiplier=1.0", "runner.steps=null"])
        cfg.runner.epochs = 0.001
        with pytest.raises(
            config_lib.ConfigError, match=r"runner.epochs=0.001 gives 0 logical steps .*>= 0.00427 "
        ):
            plan_mechanism(cfg, 60_000)


def test_planning_with_a_batch_larger_than_the_data_names_runner_batch_size():
    from dpbench.privacy.mechanism import plan_mechanism

    with pytest.raises(config_lib.ConfigError, match="runner.batch_size=256 is larger than the training set"):
        plan_mechanism(compose_config([]), 100)


def test_the_planning_command_names_runner_batch_size_in_one_line(tmp_path, fixture_data):
    done = run_cli(
        "-m",
        "dpbench.privacy",
        f"paths.data_root={fixture_data}",
        "runner.batch_size=100000",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: runner.batch_size=100000 is larger than")
    assert "Traceback" not in done.stderr
