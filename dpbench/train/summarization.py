"""Dialogue summarisation with a decoder: loss on response tokens, greedy generation, ROUGE.

The loss of an example is its mean token negative log-likelihood over the response (summary +
end-of-sequence), so prompt tokens and padding contribute nothing. Evaluation generates a summary
for every evaluation dialogue with the KV cache and scores ROUGE-1/2/L F1 against the reference.

Only the response needs logits: when the model offers ``extras["hidden_states_fn"]`` and
``extras["logits_fn"]`` (Gemma 3 does), the loss gathers the final hidden states of the positions
that predict a response token, a static count per example (the longest tokenised training summary
plus eos), and computes the output layer on those alone. On Gemma 3 270M that layer (262,144-way)
is most of the forward FLOPs, and summaries are a fraction of each sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from dpbench.data import text
from dpbench.errors import ConfigError
from dpbench.models.gemma3.generate import greedy_generate
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


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def response_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-example mean NLL of the tokens marked by ``loss_mask`` (predicted from the position before)."""
    return _masked_mean(_token_nll(logits[:, :-1], input_ids[:, 1:]), loss_mask[:, 1:])


def target_positions(loss_mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """The first ``count`` positions ``t`` (in order) whose next token is a loss token, ``[B, count]``,
    and whether each is real (rows with fewer such positions are filled with position 0, not real).

    >>> positions, real = target_positions(jnp.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]), 3)
    >>> positions.tolist(), real.astype(int).tolist()
    ([[1, 2, 0], [0, 1, 2]], [[1, 1, 0], [1, 0, 0]])
    """
    predicts_target = loss_mask[:, 1:].astype(bool)  # position t predicts token t + 1
    # A stable sort on "not a target" lists the target positions first, in sequence order.
    positions = jnp.argsort(~predicts_target, axis=1, stable=True)[:, :count]
    return positions, jnp.take_along_axis(predicts_target, positions, axis=1)


def max_response_tokens(summaries: Sequence[str], tokenizer, max_length: int) -> int:
    """The most loss tokens any training sequence of ``text.build_lm_examples`` can hold: the longest
    tokenised summary plus eos, at most ``max_length - 1`` (the first token is never a target).

    >>> from dpbench.models.gemma3 import Gemma3ByteTokenizer
    >>> max_response_tokens(["hi", "hello"], Gemma3ByteTokenizer(), max_length=512)
    6
    >>> max_response_tokens(["hello"], Gemma3ByteTokenizer(), max_length=4)
    3
    """
    eos = 0 if tokenizer.eos_id is None else 1
    longest = max((len(tokenizer.encode(str(s), add_special_tokens=False)) for s in summaries), default=0)
    return max(1, min(longest + eos, max_length - 1))


class SummarizationTask:
    """Response-only loss for training, greedy generation and ROUGE for evaluation.

    ``train_summaries`` (the training split's summaries) fixes how many positions per example the
    loss computes logits for; without it, or without the model's ``hidden_states_fn`` /
    ``logits_fn``, the loss uses the full logits ``apply_fn`` returns.
    """

    name = "summarization"
    # audit=canary: dialogues with secret summaries (dpbench.privacy.canaries).
    CANARIES = {"text": "dialogue"}

    def __init__(
        self,
        bundle,
        dataset_cfg,
        progress_bar: bool = True,
        num_samples: int = 5,
        train_summaries: Sequence[str] | None = None,
    ):
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
        extras = bundle.extras or {}
        self.hidden_states_fn = extras.get("hidden_states_fn")
        self.logits_fn = extras.get("logits_fn")
        self.max_targets = None
        if train_summaries is not None and self.hidden_states_fn and self.logits_fn:
            self.max_targets = max_response_tokens(train_summaries, self.tokenizer, dataset_cfg.max_length)

    @classmethod
    def build(cls, bundle, dataset, cfg) -> SummarizationTask:
        return cls(
            bundle,
            cfg.dataset,
            progress_bar=cfg.runner.progress_bar,
            train_summaries=dataset.train["summary"],
        )

    @staticmethod
    def prepare(dataset, bundle, cfg) -> tuple[dict, dict, dict]:
        """Tokenised prompt + summary training sequences; the evaluation split stays text."""
        train, train_stats = text.build_lm_examples(
            dataset.train["dialogue"], dataset.train["summary"], bundle.tokenizer, cfg.dataset.max_length
        )
        return train, dataset.eval, {"truncated": {"train": train_stats}}

    @staticmethod
    def prepare_canaries(canaries: dict, dataset, bundle, cfg) -> dict:
        """Canary dialogues + secret summaries as training sequences, whole: a cut secret, or a
        summary longer than the longest training summary (the loss computes logits for that many
        positions), is refused."""
        arrays, stats = text.build_lm_examples(
            canaries["dialogue"], canaries["summary"], bundle.tokenizer, cfg.dataset.max_length
        )
        if stats["num_truncated_prompt"] or stats["num_truncated_response"]:
            raise ConfigError(
                f"audit=canary: dataset.max_length={cfg.dataset.max_length} cuts "
                f"{stats['num_truncated_prompt'] + stats['num_truncated_response']} canary dialogues; "
                "choose a larger dataset.max_length (or fewer audit.secret_digits)"
            )
        longest = max_response_tokens(dataset.train["summary"], bundle.tokenizer, cfg.dataset.max_length)
        needed = max_response_tokens(canaries["summary"], bundle.tokenizer, cfg.dataset.max_length)
        if needed > longest:
            raise ConfigError(
                f"audit.secret_digits: canary summaries need {needed} tokens, more than the longest "
                f"training summary ({longest}); choose fewer audit.secret_digits"
            )
        return arrays

    def losses_fn(self, trainable, batch, frozen):
        params = merge_params(trainable, frozen)
        if self.max_targets is None:
            return response_nll(self.apply_fn(params, batch), batch["input_ids"], batch["loss_mask"]), {}
        count = min(self.max_targets, batch["input_ids"].shape[1] - 1)
        positions, real = target_positions(batch["loss_mask"], count)
        hidden = jnp.take_along_axis(self.hidden_states_fn(params, batch), positions[..., None], axis=1)
        targets = jnp.take_along_axis(batch["input_ids"], positions + 1, axis=1)
        return _masked_mean(_token_nll(self.logits_fn(params, hidden), targets), real), {}

    def generate(self, params, dialogues, batch_size: int, mesh=None) -> tuple[list[str], dict]:
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
                mesh=mesh,
            )
            for row in tokens[: min(batch_size, n - start)]:
                ids = [int(t) for t in row if int(t) not in self.stop_ids and int(t) != self.tokenizer.pad_id]
                outputs.append(self.tokenizer.decode(ids).strip())
        return outputs, stats

    def evaluate(self, trainable, frozen, arrays: dict, batch_size: int, mesh) -> dict:
        params = merge_params(trainable, frozen)  # generation rows split over the mesh like training's
        predictions, stats = self.generate(params, list(arrays["dialogue"]), batch_size, mesh)
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
