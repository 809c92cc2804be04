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
    optimizer state. ``float32_variant`` (None when the model already computes in float32) builds the
    same model computing in float32: see :meth:`in_float32`.
    """

    apply_fn: Callable[[PyTree, dict], Any]
    params: PyTree
    is_trainable: Callable[[tuple[str, ...]], bool]
    weights_source: str  # e.g. "random init", "hf:/path/to/checkpoint", "gguf:/path/file.gguf"
    tokenizer: Any = None  # a dpbench.data.base.Tokenizer for text models
    module: Any = None  # the flax module, for generation and export
    extras: dict = dataclasses.field(default_factory=dict)
    float32_variant: Callable[[], ModelBundle] | None = None

    def in_float32(self) -> ModelBundle:
        """This model computing in float32: the same parameter tree and names (the module casts the
        parameters it uses to its compute dtype), the same functions in ``extras``; ``self`` when it
        already computes in float32. For checks that must see structure, not bfloat16 rounding (the
        fast-clipping tap coverage check)."""
        if self.float32_variant is None:
            return self
        variant = self.float32_variant()  # its functions; the parameters are this bundle's (current) ones
        return dataclasses.replace(
            self,
            apply_fn=variant.apply_fn,
            module=variant.module,
            extras=variant.extras,
            float32_variant=None,
        )
