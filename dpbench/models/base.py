"""What the runner gets from any model. Models never import data code."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

PyTree = Any


@dataclasses.dataclass
class ModelBundle:
    """A model ready for the runner.

    ``apply_fn(params, batch)`` is a pure function of the full parameter tree and a batch dict
    (the same keys the data code produces) to outputs (logits). ``is_trainable(path)`` says for a
    parameter path (tuple of names) whether it trains; frozen parameters never get gradients or
    optimizer state.
    """

    apply_fn: Callable[[PyTree, dict], Any]
    params: PyTree
    is_trainable: Callable[[tuple[str, ...]], bool]
    weights_source: str  # e.g. "random init", "hf:/path/to/checkpoint", "gguf:/path/file.gguf"
    tokenizer: Any = None  # a dpbench.data.base.Tokenizer for text models
    module: Any = None  # the flax module, for generation and export
    extras: dict = dataclasses.field(default_factory=dict)
