"""Turn text examples into fixed-length token arrays with any ``Tokenizer`` (see ``base.py``).

Classification: ``tokenize_classification``. Summarisation uses one prompt,
``PROMPT_TEMPLATE``, for training (``build_lm_examples``) and generation (``build_prompts``);
both encode the prompt in the same pieces (head, dialogue, tail) so that a prompt is the same
token sequence at training and at evaluation, and both cut only the dialogue when it is too long.
Every function returns ``(arrays, stats)``: int32 arrays of shape [N, length] and counts of what
was truncated. No example is ever dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpbench.data.base import Tokenizer

PROMPT_HEAD = "Summarize the following dialogue:\n"
PROMPT_TAIL = "\nSummary:\n"
PROMPT_TEMPLATE = PROMPT_HEAD + "{dialogue}" + PROMPT_TAIL
_SUFFIX_PROBE = "hello world"


def format_prompt(dialogue: str) -> str:
    """The summarisation prompt as text (what the token ids of ``build_prompts`` spell).

    >>> format_prompt("A: hi")
    'Summarize the following dialogue:\\nA: hi\\nSummary:\\n'
    """
    return PROMPT_TEMPLATE.format(dialogue=dialogue)


def special_suffix_length(tokenizer: Tokenizer) -> int:
    """How many special ids ``encode(text, add_special_tokens=True)`` appends (BERT/RoBERTa 1, Gemma 0).

    Found by locating the plain encoding of a probe inside its encoding with special tokens.
    """
    with_special = tokenizer.encode(_SUFFIX_PROBE, add_special_tokens=True)
    plain = tokenizer.encode(_SUFFIX_PROBE, add_special_tokens=False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return len(with_special) - start - len(plain)
    raise ValueError(
        f"cannot locate the special tokens: encode({_SUFFIX_PROBE!r}) gives {with_special} with and "
        f"{plain} without special tokens"
    )


def tokenize_classification(
    texts: Sequence[str], labels: Sequence[int] | np.ndarray, tokenizer: Tokenizer, max_length: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Encode texts with special tokens, right-pad with ``pad_id`` to ``max_length``.

    A text longer than ``max_length`` keeps its first ids and its trailing special ids (e.g.
    ``[CLS] w1 .. wk [SEP]``), so the model still sees the end marker it was pre-trained with.

    Returns ``({"input_ids", "attention_mask", "label"}, {"num_truncated", "longest"})`` where
    ``longest`` is the longest encoding before truncation.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    suffix = special_suffix_length(tokenizer)
    if max_length <= suffix:
        raise ValueError(f"max_length={max_length} leaves no room next to {suffix} trailing special token(s)")
    input_ids = np.full((len(texts), max_length), tokenizer.pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(texts), max_length), dtype=np.int32)
    num_truncated = longest = 0
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=True)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            ids = ids[: max_length - suffix] + (ids[len(ids) - suffix :] if suffix else [])
            num_truncated += 1
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label": np.asarray(labels, dtype=np.int32),
    }
    return arrays, {"num_truncated": num_truncated, "longest": longest}


class _PromptPieces:
    """The prompt's fixed token pieces: ``[bos] + head`` before the dialogue, ``tail`` after it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.prefix = bos + tokenizer.encode(PROMPT_HEAD, add_special_tokens=False)
        self.tail = tokenizer.encode(PROMPT_TAIL, add_special_tokens=False)

    @property
    def fixed_length(self) -> int:
        return len(self.prefix) + len(self.tail)

    def prompt(self, dialogue: str, budget: int) -> tuple[list[int], bool]:
        """Prompt ids with the dialogue cut to at most ``budget`` ids (keeping its start); was it cut?"""
        dialogue_ids = self.tokenizer.encode(dialogue, add_special_tokens=False)
        budget = max(budget, 0)
        return self.prefix + dialogue_ids[:budget] + self.tail, len(dialogue_ids) > budget


def prompt_ids(dialogue: str, tokenizer: Tokenizer) -> list[int]:
    """The whole (uncut) generation prompt of ``dialogue``: the ids ``build_prompts`` left-pads."""
    pieces = _PromptPieces(tokenizer)
    return pieces.prefix + tokenizer.encode(dialogue, add_special_tokens=False) + pieces.tail


def build_lm_examples(
    dialogues: Sequence[str], summaries: Sequence[str], tokenizer: Tokenizer, max_length: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Training sequences ``[bos] + prompt + summary + [eos]``, right-padded to ``max_length``.

    ``loss_mask[i, t]`` is 1 exactly where ``input_ids[i, t]`` is a summary token or the eos: the
    targets of next-token prediction (a loss over logits at t-1 uses ``loss_mask[:, 1:]``).
    When a sequence is too long the dialogue is cut (keeping its start, the prompt's head and its
    tail "Summary:\\n"); if even the prompt without dialogue plus the summary does not fit, the summary
    is cut at its end and the eos dropped (the cut summary has no natural end to learn).
    A missing ``bos_id`` / ``eos_id`` (None) is simply left out.

    Returns ``({"input_ids", "attention_mask", "loss_mask"}, {"num_truncated_prompt",
    "num_truncated_response"})``.
    """
    if len(dialogues) != len(summaries):
        raise ValueError(f"{len(dialogues)} dialogues but {len(summaries)} summaries")
    pieces = _PromptPieces(tokenizer)
    if max_length <= pieces.fixed_length:
        raise ValueError(
            f"max_length={max_length} cannot hold the prompt template ({pieces.fixed_length} tokens) "
            "plus one summary token"
        )
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    input_ids = np.full((len(dialogues), max_length), tokenizer.pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(dialogues), max_length), dtype=np.int32)
    loss_mask = np.zeros((len(dialogues), max_length), dtype=np.int32)
    stats = {"num_truncated_prompt": 0, "num_truncated_response": 0}
    for row, (dialogue, summary) in enumerate(zip(dialogues, summaries, strict=True)):
        response = tokenizer.encode(summary, add_special_tokens=False) + eos
        prompt, cut = pieces.prompt(dialogue, max_length - pieces.fixed_length - len(response))
        stats["num_truncated_prompt"] += cut
        if len(prompt) + len(response) > max_length:
            response = response[: max_length - len(prompt)]
            stats["num_truncated_response"] += 1
        length = len(prompt) + len(response)
        input_ids[row, :length] = prompt + response
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt) : length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}, stats


def build_prompts(
    dialogues: Sequence[str], tokenizer: Tokenizer, max_prompt_length: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Generation prompts ``[bos] + prompt``, LEFT-padded to ``max_prompt_length``.

    Left padding puts every prompt's last token in the last column, so generation appends to all
    rows at once; a generator computes positions as ``cumsum(prompt_mask) - 1``. Long dialogues
    are cut exactly as in ``build_lm_examples``.

    Returns ``({"prompt_ids", "prompt_mask"}, {"num_truncated_prompt"})``.
    """
    pieces = _PromptPieces(tokenizer)
    if max_prompt_length < pieces.fixed_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} cannot hold the prompt template "
            f"({pieces.fixed_length} tokens)"
        )
    prompt_ids = np.full((len(dialogues), max_prompt_length), tokenizer.pad_id, dtype=np.int32)
    prompt_mask = np.zeros((len(dialogues), max_prompt_length), dtype=np.int32)
    num_truncated = 0
    for row, dialogue in enumerate(dialogues):
        prompt, cut = pieces.prompt(dialogue, max_prompt_length - pieces.fixed_length)
        num_truncated += cut
        prompt_ids[row, max_prompt_length - len(prompt) :] = prompt
        prompt_mask[row, max_prompt_length - len(prompt) :] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, {"num_truncated_prompt": num_truncated}
