"""Containers shared by every data loader. Data code knows nothing of models."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What data code needs from a tokenizer (models provide it, data code only calls it)."""

    pad_id: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass
class Dataset:
    """A train split and an evaluation split as dicts of equally long arrays.

    Text loaders fill the arrays with strings (``np.ndarray`` of ``object``); ``dpbench.data.text``
    turns them into fixed-length token arrays once the model's tokenizer is known.
    """

    name: str  # what results tables show, e.g. "SST-2 (RT stand-in)"
    source: str  # where the examples actually came from, e.g. "idx:/data/mnist"
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    eval_split: str = "test"
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for split_name, split in (("train", self.train), ("eval", self.eval)):
            lengths = {k: len(v) for k, v in split.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{self.name} {split_name} arrays differ in length: {lengths}")

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))

    @property
    def num_eval(self) -> int:
        return len(next(iter(self.eval.values())))
