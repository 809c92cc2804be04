"""Dialogue summarisation with a decoder: loss on response tokens, greedy generation, ROUGE.

The loss of an example is its mean token negative log-likelihood over the response (summary +
end-of-sequence), so prompt tokens and padding contribute nothing. Evaluation generates a summary
for every evaluation dialogue with the KV cache and scores ROUGE-1/2/L F1 against the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from dpbench.data import text
from dpbench.models.generate import greedy_generate
from dpbench.train.loop import merge_params

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_f1(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 (with stemming, as the SAMSum literature reports it).

    >>> rouge_f1(["the cat sat"], ["the cat sat"])["rouge1"]
    1.0
    """
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / max(len(predictions), 1) for name, total in totals.items()}


def response_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-example mean NLL of the tokens marked by ``loss_mask`` (predicted from the position before)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(nll * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class SummarizationTask:
    name = "summarization"

    def __init__(self, bundle, dataset_cfg, progress_bar: bool = True, num_samples: int = 5):
        self.apply_fn = bundle.apply_fn
        self.module = bundle.module
        self.tokenizer = bundle.tokenizer
        self.max_prompt_length = dataset_cfg.max_prompt_length
        self.max_new_tokens = dataset_cfg.max_new_tokens
        self.progress_bar = progress_bar
        self.num_samples = num_samples
        stop = [self.tokenizer.eos_id, getattr(self.tokenizer, "end_of_turn_id", None)]
        self.stop_ids = tuple(i for i in stop if i is not None)
        self.samples: list[dict] = []

    def losses_fn(self, trainable, batch, frozen):
        logits = self.apply_fn(merge_params(trainable, frozen), batch)
        return response_nll(logits, batch["input_ids"], batch["loss_mask"]), {}

    def generate(self, params, dialogues, batch_size: int) -> tuple[list[str], dict]:
        prompts, stats = text.build_prompts(dialogues, self.tokenizer, self.max_prompt_length)
        outputs = []
        n = len(dialogues)
        for start in tqdm(range(0, n, batch_size), desc="generate", disable=not self.progress_bar):
            idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # pad the last batch
            tokens = greedy_generate(
                self.module,
                params,
                prompts["prompt_ids"][idx],
                prompts["prompt_mask"][idx],
                self.max_new_tokens,
                stop_ids=self.stop_ids,
                pad_id=self.tokenizer.pad_id,
            )
            for row in tokens[: min(batch_size, n - start)]:
                ids = [int(t) for t in row if int(t) not in self.stop_ids and int(t) != self.tokenizer.pad_id]
                outputs.append(self.tokenizer.decode(ids).strip())
        return outputs, stats

    def evaluate(self, trainable, frozen, arrays: dict, batch_size: int, mesh) -> dict:
        del mesh  # generation runs on the default device; it is evaluation, not the DP step
        params = merge_params(trainable, frozen)
        predictions, stats = self.generate(params, list(arrays["dialogue"]), batch_size)
        references = [str(s) for s in arrays["summary"]]
        scores = rouge_f1(predictions, references)
        self.samples = [
            {"dialogue": str(d)[:300], "reference": r, "generated": p}
            for d, r, p in list(zip(arrays["dialogue"], references, predictions))[: self.num_samples]
        ]
        return {
            **{f"eval/{name}": value for name, value in scores.items()},
            "eval/examples": len(predictions),
            "eval/prompts_truncated": int(stats["num_truncated_prompt"]),
        }
