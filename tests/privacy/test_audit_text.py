"""audit=canary on text: SST-2 sentence canaries, SAMSum dialogue canaries with secrets, exposure."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dpbench import config as config_lib
from dpbench import experiment
from dpbench.data.registry import load_dataset
from dpbench.errors import ConfigError
from dpbench.models.registry import build_model
from dpbench.privacy import canaries as canaries_lib
from dpbench.privacy.audit import epsilon_lower_bound
from dpbench.privacy.audit_run import EXPOSURE_CANARIES, NONPRIVATE_AUDIT_DELTA, build_canary_audit
from dpbench.train import sharding
from dpbench.train.tasks import ClassificationTask, canary_type, task_class
from tests.helpers import TINY, compose_config

SST2 = ["model=tiny_encoder", "dataset=sst2_rt", "audit=canary"]
SAMSUM = ["model=tiny_gemma3", "dataset=samsum_aclsum", "audit=canary"]


def _parts(overrides, tmp_path):
    cfg = compose_config([*TINY, *overrides], tmp_path)
    dataset = load_dataset(cfg.dataset)
    bundle = build_model(cfg.model, jax.random.PRNGKey(0))
    task_type = task_class(cfg.dataset.task)
    train_arrays, _, _ = task_type.prepare(dataset, bundle, cfg)
    return cfg, dataset, bundle, task_type, train_arrays


class RowMemory:
    """A stand-in model that memorised the token rows in ``trainable['memory']``: loss 0 for those,
    otherwise 1 + the mean absolute token difference to the first memorised row (distinct per row)."""

    def losses_fn(self, trainable, batch, frozen):
        ids = batch["input_ids"].astype(jnp.float32)
        memory = trainable["memory"].astype(jnp.float32)
        seen = jnp.any(jnp.all(ids[:, None] == memory[None], axis=-1), axis=1)
        other = 1.0 + jnp.mean(jnp.abs(ids - memory[0]), axis=-1)
        return jnp.where(seen, 0.0, other), {}


def test_every_task_declares_its_canaries():
    assert canary_type("classification", "image") == "image"
    assert canary_type("classification", "text") == "sentence"
    assert canary_type("summarization", "text") == "dialogue"
    with pytest.raises(ConfigError, match="dataset.task=summarization on image input: it declares no canary"):
        canary_type("summarization", "image")


def test_an_audit_on_a_task_without_canaries_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(ClassificationTask, "CANARIES", {"image": "image"})
    cfg = compose_config([*TINY, *SST2], tmp_path)
    with pytest.raises(ConfigError) as error:
        config_lib.validate_static(cfg)
    message = str(error.value)
    assert "\n" not in message and "audit=canary is not allowed for dataset.task=classification" in message
    assert "choose audit=none" in message


def test_sentence_canaries_are_random_words_with_random_labels():
    canaries = canaries_lib.make_sentence_canaries(400, num_classes=2, seed=0)
    assert len(set(canaries["text"])) == 400  # each canary is its own trial
    assert abs(int(canaries["label"].sum()) - 200) < 60  # fair labels: 3 standard deviations
    again = canaries_lib.make_sentence_canaries(400, num_classes=2, seed=0)
    np.testing.assert_array_equal(again["text"], canaries["text"])


def test_sst2_canaries_are_tokenised_like_the_data_and_appended(tmp_path):
    cfg, dataset, bundle, task_type, train = _parts([*SST2, "audit.num_canaries=20"], tmp_path)
    audit = build_canary_audit(cfg, task_type, dataset, bundle, train)
    raw = canaries_lib.make_sentence_canaries(20, num_classes=2, seed=cfg.audit.seed)
    expected = ClassificationTask.prepare(type(dataset)(**{**dataset.__dict__, "train": raw}), bundle, cfg)[
        0
    ]  # the task's own tokenisation of the canary sentences
    for key in ("input_ids", "attention_mask", "label"):
        np.testing.assert_array_equal(audit.canaries[key], expected[key])
        np.testing.assert_array_equal(
            audit.train_arrays[key][len(train["label"]) :], expected[key][audit.included]
        )
    assert audit.kind == "sentence" and audit.candidate_arrays is None


def test_sst2_canaries_that_do_not_fit_max_length_are_refused(tmp_path):
    cfg, dataset, bundle, task_type, train = _parts(
        [*SST2, "audit.num_canaries=8", "dataset.max_length=16"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"canary sentences need \d+ tokens and dataset.max_length=16"):
        build_canary_audit(cfg, task_type, dataset, bundle, train)


def test_samsum_canaries_carry_secrets_in_their_summaries(tmp_path):
    cfg, dataset, bundle, task_type, train = _parts(
        [*SAMSUM, "audit.num_canaries=10", "audit.exposure_candidates=7", "audit.secret_digits=5"], tmp_path
    )
    audit = build_canary_audit(cfg, task_type, dataset, bundle, train)
    raw = canaries_lib.make_dialogue_canaries(10, digits=5, seed=cfg.audit.seed)
    np.testing.assert_array_equal(audit.secrets, raw["secret"])
    tokenizer = bundle.tokenizer
    for row, mask, name, secret in zip(
        audit.canaries["input_ids"], audit.canaries["loss_mask"], raw["name"], raw["secret"], strict=True
    ):
        assert name in str(raw["dialogue"][list(raw["name"]).index(name)])
        summary = tokenizer.decode(
            [int(t) for t, m in zip(row, mask, strict=True) if m and t != tokenizer.eos_id]
        )
        assert summary == f"The secret code of {name} is {secret}."  # the loss falls on the secret summary
    # candidates: the same dialogue with 7 other secrets each, canary-major
    assert len(audit.candidate_arrays["input_ids"]) == 10 * 7
    prompt_end = int(np.argmax(audit.canaries["loss_mask"][0]))
    np.testing.assert_array_equal(
        audit.candidate_arrays["input_ids"][:7, :prompt_end],
        np.repeat(audit.canaries["input_ids"][:1, :prompt_end], 7, axis=0),
    )
    assert audit.secret_space == 10**5


def test_exposure_matches_the_secret_sharer_definition():
    rng = np.random.default_rng(0)
    candidates = rng.normal(5.0, 1.0, size=2000)
    # rank-based: 1 + #lower candidates out of c + 1
    assert canaries_lib.exposure(-10.0, candidates, 10**6)["sampled"] == pytest.approx(math.log2(2001))
    median = canaries_lib.exposure(5.0, candidates, 10**6)
    assert median["sampled"] == pytest.approx(1.0, abs=0.1) and median["extrapolated"] == pytest.approx(
        1, abs=0.1
    )
    # extrapolated: -log2 of the fitted CDF, here a normal: Φ(-4) -> 14.9 bits
    far = canaries_lib.exposure(1.0, candidates, 10**6)["extrapolated"]
    assert far == pytest.approx(-math.log2(scipy.stats.norm.cdf(-4)), rel=0.1)
    assert canaries_lib.exposure(-1e6, candidates, 10**6)["extrapolated"] == pytest.approx(math.log2(10**6))


def test_a_model_that_memorised_its_secrets_is_caught_with_full_exposure(tmp_path):
    cfg, dataset, bundle, task_type, train = _parts(
        [*SAMSUM, "audit.num_canaries=20", "audit.exposure_candidates=15"],
        tmp_path,
    )
    audit = build_canary_audit(cfg, task_type, dataset, bundle, train)
    memory = {"memory": jnp.asarray(audit.canaries["input_ids"][audit.included])}
    mesh = sharding.make_mesh()
    result = audit.evaluate(RowMemory(), memory, {}, mesh, 16 * mesh.size, claimed_epsilon=None, delta=None)
    scores = np.array(result["scores"])
    assert np.all(scores[audit.included] == 0) and np.all(scores[~audit.included] < 0)
    expected = epsilon_lower_bound(scores, audit.included, NONPRIVATE_AUDIT_DELTA)
    # 20 canaries, all guessed right: the most 20 can show is small, but well above 0
    assert result["epsilon_lower_bound"] == expected["epsilon_lower_bound"] > 0.5
    exposure = result["exposure"]
    assert exposure["candidates"] == 15 and exposure["secret_space"] == 10**6
    measured = min(20, EXPOSURE_CANARIES)
    assert exposure["included"]["count"] + exposure["excluded"]["count"] == measured
    # every memorised secret beats all 15 other secrets: the most a sample of 15 can show
    assert exposure["included"]["mean_sampled"] == pytest.approx(math.log2(16))
    assert exposure["excluded"]["mean_sampled"] < math.log2(16)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sst2_audit_runs_end_to_end_and_counts_canaries(tmp_path, finetune):
    overrides = [*SST2, "audit.num_canaries=30", "dp=none", f"model.finetune={finetune}"]
    record = experiment.run(compose_config([*TINY, *overrides], tmp_path))
    audit = record["audit"]
    assert record["config"]["model"]["finetune"] == finetune
    assert audit["canary_type"] == "sentence" and audit["m"] == 30 and "exposure" not in audit
    assert record["train_examples"] == 64 + audit["num_included"]
    assert audit["claimed_epsilon"] is None and audit["delta"] == NONPRIVATE_AUDIT_DELTA


@pytest.mark.slow
def test_samsum_audit_runs_end_to_end_and_counts_canaries(tmp_path):
    # ~90 s on 2 busy cores: DP-SGD compiles per-example gradients of the tiny Gemma, then generates.
    overrides = [
        *SAMSUM,
        "audit.num_canaries=16",
        "audit.exposure_candidates=3",
        "dp=vanilla",
        "dp.epsilon=8",
    ]
    record = experiment.run(compose_config([*TINY, *overrides], tmp_path))
    audit = record["audit"]
    assert audit["canary_type"] == "dialogue" and audit["m"] == 16
    assert record["train_examples"] == 20 + audit["num_included"]  # the accountant's n holds the canaries
    assert audit["claimed_epsilon"] == pytest.approx(8, abs=1e-2)
    assert set(audit["exposure"]) >= {"included", "excluded", "secret_space", "candidates"}
