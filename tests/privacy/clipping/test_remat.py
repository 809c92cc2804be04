"""model.remat under ghost and book-keeping clipping: the decoder blocks are checkpointed with their layer
taps as explicit inputs and results, and the clipped sums equal per-example clipping (tiny Gemma 3)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from dpbench.data import text
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3
from dpbench.models.remat import CPU_KEEP_REMAT
from dpbench.privacy import clipping
from dpbench.train.loop import split_params
from dpbench.train.summarization import SummarizationTask
from tests.privacy.clipping.test_fast_exact import DIALOGUES, SUMMARIES, check_exact, perturb_lora_b


def gemma_problem(finetune: str, remat: str):
    cfg = Gemma3ModelConfig(
        preset="tiny",
        random_init=True,
        tokenizer="bytes",
        lora_rank=2,
        lora_alpha=2,
        finetune=finetune,
        remat=remat,
    )
    bundle = build_gemma3(cfg, jax.random.key(0))
    bundle.params = perturb_lora_b(bundle.params)
    arrays, _ = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 80)
    data_cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 80})
    task = SummarizationTask(bundle, data_cfg, train_summaries=SUMMARIES)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    return task.losses_fn, trainable, frozen, arrays


def checkpoints_in(losses_fn, trainable, frozen, arrays, implementation: str) -> int:
    """How many checkpointed (remat) calls the traced clipped-sum step holds."""
    batch = {k: jnp.asarray(v[:2]) for k, v in arrays.items()}
    step = functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=implementation)
    jaxpr = jax.make_jaxpr(lambda t: step(t, batch, jnp.ones(2, bool), 1.0, frozen))(trainable)
    return len(re.findall(r"\b(?:remat\d*|checkpoint)\[", str(jaxpr)))


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_lora_fast_clipping_equals_per_example(remat):
    problem = gemma_problem("lora", remat)
    # The blocks really are checkpointed while the taps record (not skipped): 6 layers.
    for implementation in ("ghost", "bookkeeping"):
        assert checkpoints_in(*problem, implementation) >= 6
    losses_fn, trainable, frozen, arrays = problem
    check_exact(losses_fn, trainable, arrays, np.arange(5), 2, frozen)


@pytest.mark.slow  # ~30 s
def test_remat_full_finetune_fast_clipping_equals_per_example():
    # Norm scales (diag taps) inside the blocks, the tied embedding tapped twice outside them.
    losses_fn, trainable, frozen, arrays = gemma_problem("full", "full")
    check_exact(losses_fn, trainable, arrays, np.arange(5), 2, frozen)


def test_remat_changes_nothing_in_the_clipped_sum():
    plain = gemma_problem("lora", "none")
    remat = gemma_problem("lora", "full")
    assert checkpoints_in(*plain, "bookkeeping") == 0
    batch = {k: jnp.asarray(v[:4]) for k, v in plain[3].items()}
    sums = [
        jax.jit(functools.partial(clipping.clipped_grad_sum, losses_fn, clipping="bookkeeping"))(
            trainable, batch, jnp.ones(4, bool), 0.01, frozen
        )[0]
        for losses_fn, trainable, frozen, _ in (plain, remat)
    ]
    for path, value in sums[0].items():
        np.testing.assert_allclose(sums[1][path], value, rtol=1e-5, atol=1e-8)


def test_cpu_run_warns_when_remat_would_save_nothing(tmp_path, caplog, monkeypatch):
    from dpbench import experiment
    from tests.helpers import TINY, compose_config

    monkeypatch.setenv("XLA_FLAGS", "")
    short = ["dataset.max_length=96", "dataset.max_prompt_length=64", "dataset.max_new_tokens=4"]
    overrides = [*TINY, *short, "model=tiny_gemma3", "dataset=samsum_aclsum", "model.remat=full"]
    with caplog.at_level("WARNING", logger="dpbench"):
        experiment.build(compose_config(overrides, tmp_path))
    assert "model.remat=full saves no memory on XLA:CPU" in caplog.text
    caplog.clear()
    monkeypatch.setenv("XLA_FLAGS", CPU_KEEP_REMAT)
    with caplog.at_level("WARNING", logger="dpbench"):
        experiment.build(compose_config([*overrides[:-1], "model.remat=none"], tmp_path / "none"))
        experiment.build(compose_config(overrides, tmp_path / "kept"))
    assert "saves no memory" not in caplog.text
