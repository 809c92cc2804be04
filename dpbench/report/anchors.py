"""Published numbers from ``results/anchors.yaml`` (values and sources from ../shared/ANCHORS.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

ANCHORS_FILE = Path(__file__).resolve().parents[2] / "results" / "anchors.yaml"


@dataclasses.dataclass(frozen=True)
class Anchor:
    task: str  # dataset family: mnist | sst2 | samsum | cifar10 (published only)
    label: str  # who published it, e.g. "dp-lora FFA"
    model: str
    method: str  # none | vanilla | ffa | untuned | bookkeeping | multi_epoch_mf
    epsilon: float | None  # None: non-private (or untuned)
    metrics: dict
    source: str
    lora_rank: int | None = None
    delta: float | None = None
    setting: str | None = None
    approx: bool = False
    beyond_shared_page: bool = False  # read from its source directly, not listed in ../shared/ANCHORS.md


def load_anchors(path: str | Path = ANCHORS_FILE) -> list[Anchor]:
    """Every published point; a missing file gives none (reports still work without it)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [Anchor(**entry) for entry in yaml.safe_load(path.read_text())["anchors"]]
