"""SummarizationTask: ROUGE on known strings, a loss on response tokens only (computed on the
response positions alone, equal to the full-logits loss), and a tiny DP LoRA run end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf

from dpbench.data import text
from dpbench.experiment import run
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3
from dpbench.train.loop import split_params
from dpbench.train.summarization import (
    SummarizationTask,
    max_response_tokens,
    response_nll,
    rouge_f1,
    target_positions,
)
from tests.helpers import TINY, compose_config

DIALOGUES = [
    "Anna: are we still on for lunch?\nBen: yes, 12:30 at the usual place.",
    "Tom: I lost my keys again.\nMia: check the kitchen drawer.\nTom: found them, thanks!",
    "Zoe: hi",
]
SUMMARIES = ["Anna and Ben meet for lunch at 12:30.", "Mia helps Tom find his keys.", "Zoe greets."]


# ---------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_identical_and_disjoint():
    assert rouge_f1(["Amanda baked cookies."], ["Amanda baked cookies."]) == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    assert rouge_f1(["Amanda baked cookies"], ["Jerry will bring them"]) == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }


def test_rouge_partial_overlap_by_hand():
    # Prediction "john went home" vs reference "john went to the shop": 2 of 3 / 5 unigrams
    # (F1 = 2 * 2/3 * 2/5 / (2/3 + 2/5) = 1/2), 1 of 2 / 4 bigrams (F1 = 1/3), LCS "john went" (1/2).
    partial = rouge_f1(["John went home"], ["John went to the shop."])
    assert partial == pytest.approx({"rouge1": 0.5, "rouge2": 1 / 3, "rougeL": 0.5})
    # Same words, different order: unigrams all match, bigrams 3 of 4, LCS "john went to" = 3/5.
    shuffled = rouge_f1(["the shop john went to"], ["John went to the shop"])
    assert shuffled == pytest.approx({"rouge1": 1.0, "rouge2": 0.75, "rougeL": 0.6})
    # The mean over examples.
    both = rouge_f1(["John went home", "the shop john went to"], ["John went to the shop."] * 2)
    assert both == pytest.approx({"rouge1": 0.75, "rouge2": (1 / 3 + 0.75) / 2, "rougeL": 0.55})


# ---------------------------------------------------------------------------------------------
# The loss


def _loss_mask_example():
    rng = np.random.default_rng(0)
    input_ids = rng.integers(5, 50, (2, 8))
    loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]])
    return jnp.asarray(rng.normal(size=(2, 8, 50)), jnp.float32), input_ids, loss_mask


def test_loss_ignores_logits_at_prompt_and_padding_positions():
    logits, input_ids, loss_mask = _loss_mask_example()
    base = response_nll(logits, input_ids, loss_mask)
    # Logits at t predict token t + 1: row 0's targets are tokens 3..5 (logits 2..4), so logits at
    # 0, 1 (prompt), 5, 6 (padding) and 7 (predicts nothing) must not matter.
    noise = jnp.asarray(np.random.default_rng(1).normal(size=logits.shape) * 10, jnp.float32)
    unused = jnp.asarray([[1, 1, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 1]], jnp.float32)[..., None]
    np.testing.assert_allclose(response_nll(logits + noise * unused, input_ids, loss_mask), base, rtol=1e-6)
    changed = response_nll(logits + noise * (1 - unused), input_ids, loss_mask)
    assert np.all(np.abs(np.asarray(changed - base)) > 1e-3)


def test_loss_is_the_mean_nll_of_the_response_tokens():
    logits, input_ids, loss_mask = _loss_mask_example()
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = [
        -np.mean([log_probs[row, t - 1, input_ids[row, t]] for t in np.flatnonzero(loss_mask[row])])
        for row in range(2)
    ]
    np.testing.assert_allclose(response_nll(logits, input_ids, loss_mask), expected, rtol=1e-5)


def test_target_positions_keep_order_and_mark_fill():
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    positions, real = target_positions(loss_mask, 4)
    assert positions[0].tolist()[:3] == [1, 2, 3] and real.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]


def _tiny_bundle(max_length: int = 96):
    cfg = Gemma3ModelConfig(preset="tiny", random_init=True, tokenizer="bytes", lora_rank=2, lora_alpha=2)
    bundle = build_gemma3(cfg, jax.random.key(0))
    # Non-zero LoRA B, so the adapters take part in the comparison.
    flat = flatten_dict(bundle.params)
    rng = np.random.default_rng(3)
    for path in flat:
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(rng.normal(size=flat[path].shape) * 0.1, jnp.float32)
    bundle.params = unflatten_dict(flat)
    arrays, stats = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, max_length)
    return bundle, arrays, stats


def test_response_budget_covers_every_training_row():
    bundle, arrays, stats = _tiny_bundle(max_length=120)
    budget = max_response_tokens(SUMMARIES, bundle.tokenizer, 120)
    assert budget == max(len(s.encode()) for s in SUMMARIES) + 1  # bytes + eos
    assert arrays["loss_mask"].sum(axis=1).max() == budget and stats["num_truncated_response"] == 0
    # A cut response holds fewer tokens, never more.
    short, short_stats = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 50)
    assert short_stats["num_truncated_response"] > 0
    assert short["loss_mask"].sum(axis=1).max() <= max_response_tokens(SUMMARIES, bundle.tokenizer, 50)


def test_response_positions_loss_equals_full_logits_loss():
    bundle, arrays, _ = _tiny_bundle()
    assert arrays["attention_mask"][2].sum() < 96  # a right-padded row
    cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 96})
    gathered = SummarizationTask(bundle, cfg, train_summaries=SUMMARIES)
    full = SummarizationTask(bundle, cfg)
    assert gathered.max_targets == max(len(s.encode()) for s in SUMMARIES) + 1 and full.max_targets is None
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    def loss_and_grad(task):
        def summed(t):
            losses = task.losses_fn(t, batch, frozen)[0]
            return jnp.sum(losses), losses

        (_, losses), grads = jax.jit(jax.value_and_grad(summed, has_aux=True))(trainable)
        return np.asarray(losses), grads

    (losses, grads), (ref_losses, ref_grads) = loss_and_grad(gathered), loss_and_grad(full)
    assert np.all(np.isfinite(losses)) and losses.shape == (3,)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for path in ref_grads:
        np.testing.assert_allclose(grads[path], ref_grads[path], atol=1e-5, rtol=1e-4)


def test_without_model_extras_the_loss_uses_full_logits():
    bundle, arrays, _ = _tiny_bundle()
    bundle.extras = {}
    cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 96})
    task = SummarizationTask(bundle, cfg, train_summaries=SUMMARIES)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    losses, _ = jax.jit(task.losses_fn)(trainable, arrays, frozen)
    logits = jax.jit(bundle.apply_fn)(bundle.params, arrays)
    assert task.max_targets is None
    np.testing.assert_allclose(
        losses, response_nll(logits, arrays["input_ids"], arrays["loss_mask"]), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# End to end on the tiny Gemma 3


@pytest.mark.slow  # ~40 s on a loaded 2-core CPU, mostly compilation; test_config runs the same job fast
def test_tiny_dp_lora_run_reports_rouge_privacy_samples_and_truncation(tmp_path):
    overrides = [
        "+experiment=samsum_gemma270m_cpu",
        "model=tiny_gemma3",
        *TINY,
        "accountant=rdp",  # the PLD calibration alone takes longer than this whole tiny run
        "runner.eval_before_training=false",
        "dataset.max_eval_examples=6",
        "compute.eval_batch_size=4",  # 6 = 4 + a padded batch of 2
        "dataset.max_length=96",
        "dataset.max_prompt_length=64",
        "dataset.max_new_tokens=4",
        # Truncation counts of the training texts are a training-data statistic: a DP run
        # publishes them only when asked to.
        "runner.release_nonprivate_stats=true",
    ]
    results = run(compose_config(overrides, tmp_path))
    assert results["steps"] == 2 and results["method"] == "vanilla"
    metrics = results["metrics"]
    assert all(0.0 <= metrics[f"eval/{k}"] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert metrics["eval/examples"] == 6 and metrics["eval/prompts_truncated"] == 6  # byte prompts > 64
    assert 0 < results["epsilon"] <= 4.0 and results["noise_multiplier"] > 0
    samples = results["samples"]
    assert len(samples) == 5 and set(samples[0]) == {"dialogue", "reference", "generated"}
    truncated = results["data_preparation"]["truncated"]["train"]
    assert "data_preparation.truncated.train" in results["privacy"]["released_nonprivate_statistics"]
    n = results["train_examples"]  # the fixture split may hold fewer than max_train_examples=64
    assert truncated["num_truncated_prompt"] == n  # every ~900-byte abstract is cut to fit 96
    assert 0 <= truncated["num_truncated_response"] <= n
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["samples"] == results["samples"] and saved["dataset"] == "SAMSum (ACLSum stand-in)"
