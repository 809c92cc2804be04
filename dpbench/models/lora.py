"""LoRA (Hu et al. 2021) as a drop-in Dense layer, shared by the encoder and Gemma 3.

A LoRA layer computes ``x @ W + b + (alpha / r) * (x @ A) @ B`` with ``A`` drawn from a
Gaussian and ``B`` zero at init, so a fresh LoRA model equals its base model. Which Dense layers
get LoRA is chosen by name pattern (``targets``, regular expressions matched against the
layer's path such as ``layer_3/attention/query``). The factors carry the parameter labels ``lora_a`` /
``lora_b`` (``lora_label``); a DP method freezes by label (FFA freezes ``lora_a``) and never looks
inside the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench.models.base import FINETUNE_LABELS, finetune_labels
from dpbench.models.layers import LORA_A, LORA_B, LoRADense


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank 0 means no LoRA anywhere."""

    rank: int = 0
    alpha: float = 16.0
    targets: Sequence[str] = ("query", "value")

    def applies_to(self, layer_path: str) -> bool:
        return self.rank > 0 and any(re.search(t, layer_path) for t in self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def dense(spec: LoraSpec | None, layer_path: str, features: int, **kwargs) -> LoRADense:
    """The Dense layer called ``layer_path``; it carries LoRA when ``spec`` targets that path."""
    name = layer_path.rsplit("/", 1)[-1]
    rank = spec.rank if spec is not None and spec.applies_to(layer_path) else 0
    alpha = spec.alpha if spec is not None else 16.0
    return LoRADense(features=features, lora_rank=rank, lora_alpha=alpha, name=name, **kwargs)


FINETUNE_MODES = tuple(FINETUNE_LABELS)


def check_finetune(finetune: str) -> None:
    finetune_labels(finetune)  # raises, naming the choices, for an unknown mode


def effective_rank(finetune: str, lora_rank: int) -> int:
    """LoRA exists only when fine-tuning through it; ``full`` and ``head`` train the model as it is."""
    return lora_rank if finetune == "lora" else 0


def is_lora_param(path: tuple[str, ...]) -> bool:
    return path[-1] in (LORA_A, LORA_B)


def lora_label(path: tuple[str, ...]) -> str | None:
    """The parameter label of a LoRA factor (``lora_a`` / ``lora_b``, its leaf name); None otherwise."""
    return path[-1] if is_lora_param(path) else None


def merge_lora(params: Any, scale: float) -> Any:
    """Fold every ``(A, B)`` pair into its kernel, ``W + scale * A B`` (``scale = alpha / r``),
    and drop A and B: the merged tree runs in the same model built without LoRA."""
    flat = flatten_dict(params)
    merged = {}
    for path, value in flat.items():
        if is_lora_param(path):
            continue
        if path[-1] == "kernel" and path[:-1] + (LORA_A,) in flat:
            a = flat[path[:-1] + (LORA_A,)]
            b = flat[path[:-1] + (LORA_B,)]
            value = value + scale * jnp.dot(a, b)
        merged[path] = value
    return unflatten_dict(merged)
