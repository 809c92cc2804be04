"""Read run records (``results.json`` in run folders, or committed ``results/runs/**.json``) for reports.

Reports read runs only through :func:`read_run`: a :class:`Run` is a ``dpbench.records.RunRecord``
(typed fields, read by ``load_record``) plus where it came from and its ``history.jsonl`` train lines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from dpbench import records

# The metric a task is judged by (also Hydra's sweep objective in dpbench.__main__).
PRIMARY_METRIC = {"classification": "eval/accuracy", "summarization": "eval/rougeL"}

# Settings that say where or how a run ran, never what it measured: runs differing only in these are
# the same experiment.
INCIDENTAL = (
    "runner.progress_bar",
    "paths.",
    "logger.",
    "compute.",
    "runner.checkpoint",
    "runner.keep_checkpoints",
    "dataset.data_root",  # where the same data lives
    "dataset.data_dir",
    "dataset.download",
)


def flat_config(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and string values.

    >>> flat_config({"dp": {"epsilon": 1.0, "method": "vanilla"}, "runner": {"seed": 0}})
    {'dp.epsilon': '1.0', 'dp.method': 'vanilla', 'runner.seed': '0'}
    """
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def settings(runs: list, ignore: tuple[str, ...]) -> dict[int, tuple]:
    """Each run's settings (by ``id(run)``) as (key, value) pairs: its flat config less keys starting
    with ``ignore``, over the keys every run has (records from older code lack newer settings)."""
    flats = {id(run): flat_config(run.config) for run in runs}
    common = set.intersection(*(set(flat) for flat in flats.values())) if flats else set()
    keys = sorted(k for k in common if not k.startswith(ignore))
    return {ident: tuple((k, flat[k]) for k in keys) for ident, flat in flats.items()}


@dataclasses.dataclass
class Run:
    """One run as reports see it: the record's fields (``run.metrics``, ``run.epsilon``, ...) and more."""

    path: str  # the run folder, or the record file for committed records
    record: records.RunRecord
    train_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # history.jsonl "train"

    def __getattr__(self, name: str):
        # Every RunRecord field reads through (dataclass fields above are found first).
        if name == "record":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.record, name)

    @property
    def dataset_key(self) -> str:
        """The dataset family (``dataset.name``: mnist, sst2, samsum), what published anchors are keyed by."""
        return self.config["dataset"]["name"]

    @property
    def model(self) -> str:
        model = self.config["model"]
        return model.get("checkpoint") or model["arch"]

    @property
    def finetune(self) -> str | None:
        """What trained (model.finetune: lora | full | head); None for models without the setting."""
        return self.config["model"].get("finetune")

    @property
    def lora_rank(self) -> int | None:
        """The LoRA rank, if LoRA trained (full or head fine-tuning ignores model.lora_rank)."""
        rank = self.config["model"].get("lora_rank")
        return rank if rank and self.finetune in (None, "lora") else None

    @property
    def clipping(self) -> str | None:
        """How the clipped sum was computed (per_example / ghost / bookkeeping): speed, never ε."""
        if not self.private:
            return None
        recorded = (self.privacy or {}).get("clipping_implementation")
        if recorded:
            return recorded
        dp = self.config["dp"]
        # Records from before dp.clipping existed were computed per example (vmap).
        clipping = dp.get("clipping", "per_example")
        if clipping == "auto":
            from dpbench.privacy.methods import resolve_clipping

            clipping = resolve_clipping(dp["method"], clipping)
        return clipping

    @property
    def clip_rule(self) -> str | None:
        """How C was chosen (``dp.clip_fn``, ``dp.adaptive_clip``): ``fixed C=0.1``,
        ``automatic γ=0.01 C=0.1``, ``adaptive q=0.5 C=0.1→0.73`` (C's end point, a DP release)."""
        if not self.private:
            return None
        adaptive = (self.privacy or {}).get("adaptive_clip")
        if adaptive and adaptive.get("final_clip_norm") is not None:
            return f"{self.clip_setting}→{adaptive['final_clip_norm']:.3g}"
        return self.clip_setting

    @property
    def clip_setting(self) -> str | None:
        """:attr:`clip_rule` without adaptive C's end point: the setting, not its outcome."""
        if not self.private:
            return None
        dp = self.config["dp"]
        clip = f"C={dp.get('clip_norm'):g}" if dp.get("clip_norm") is not None else "C=?"
        adaptive = (self.privacy or {}).get("adaptive_clip")
        if adaptive:
            return f"adaptive q={adaptive['target_quantile']:g} {clip}"
        if dp.get("clip_fn", "fixed") == "automatic":
            return f"automatic γ={dp.get('clip_gamma', 0.01):g} {clip}"
        return f"fixed {clip}"

    @property
    def randomness(self) -> str | None:
        """``secret`` or ``seeded`` for a DP run; records from before ``dp.randomness`` are ``seeded``
        (their batches and noise followed ``runner.seed``: the claim assumes the seed was secret)."""
        if not self.private:
            return None
        return (self.privacy or {}).get("randomness", "seeded")

    @functools.cached_property
    def noise_std(self) -> dict[str, float] | None:
        """The noise std per coordinate of the averaged gradient, per step and in the running sum of
        updates (``dpbench.privacy.noise.noise_std``), from the recorded σC, expected batch, steps and
        strategy; None for non-private runs, records without those fields, and adaptive C (whose C, and
        so the noise, changes every step)."""
        if not self.private:  # a non-private record's mechanism is a sentence
            return None
        privacy = self.privacy or {}
        mechanism = privacy.get("mechanism") or {}
        sampler = mechanism.get("sampler") or {}
        batch = sampler.get("expected_batch_size") or sampler.get("batch_size")
        if privacy.get("adaptive_clip") or not batch or "noise_std_on_sum" not in mechanism:
            return None
        from dpbench.privacy import noise

        steps = mechanism["logical_steps"]
        strategy = noise.Strategy.from_description(privacy.get("noise"), steps)
        return noise.noise_std(strategy, steps, mechanism["noise_std_on_sum"], batch)

    @property
    def target_epsilon(self) -> float | None:
        return None if self.method == "none" else self.config["dp"].get("epsilon")

    @property
    def tuning(self) -> dict | None:
        """The tuning that released this run: the record's own ``tuning`` (a tuning's publishable
        ``released/results.json``), else the ``tune.json`` two folders up that names this trial
        folder; None for any other run."""
        if self.record.tuning:
            return self.record.tuning
        folder = Path(self.path)
        tune_file = folder.parent.parent / "tune.json"
        if not folder.is_dir() or not tune_file.is_file():
            return None
        tuned = json.loads(tune_file.read_text())
        released = tuned.get("released") or {}
        if not released.get("run_dir") or Path(released["run_dir"]).resolve() != folder.resolve():
            return None
        return tuned

    @property
    def epsilon_with_tuning(self) -> float | None:
        """The total ε, tuning included, of a trial that ``python -m dpbench.tune`` released."""
        return (self.tuning or {}).get("epsilon_with_tuning")

    @property
    def test_metrics(self) -> dict:
        """A released trial's metrics on the test split (measured after the choice, which read only
        the validation split); empty for any other run."""
        return ((self.tuning or {}).get("released") or {}).get("test_metrics") or {}

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC.get(self.task, "eval/accuracy")

    @property
    def private(self) -> bool:
        return self.method != "none" and self.epsilon is not None

    @property
    def label(self) -> str:
        """Short legend text: method, rank, ε."""
        parts = ["non-private" if self.method == "none" else self.method]
        if self.finetune in ("full", "head"):
            parts.append(self.finetune)
        if self.lora_rank:
            parts.append(f"r{self.lora_rank}")
        if self.private:
            parts.append(f"ε={self.epsilon:.3g}")
        return " ".join(parts)


def read_run(path: str | Path) -> Run:
    """A run from a run folder (``results.json``, and ``history.jsonl`` if present) or a record file."""
    path = Path(path)
    record_file = path / records.RESULTS_FILE if path.is_dir() else path
    record = records.load_record(record_file)
    history_file = record_file.parent / records.HISTORY_FILE
    train_history = []
    if record_file.name == records.RESULTS_FILE and history_file.is_file():
        lines = records.read_history(history_file)  # skips a line torn by an interrupted run
        train_history = sorted(
            (line for line in lines if line.get("kind") == "train"), key=lambda x: x["step"]
        )
    return Run(path=str(path), record=record, train_history=train_history)


def find_runs(roots: list[str]) -> list[Path]:
    """Every run under ``roots``: folders holding a results.json, or committed record files (``*.json``).

    A root that is a record file is taken as is; a folder is searched recursively for results.json,
    and, if it holds none, for record files.
    """
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is neither a run folder nor a record file")
        folders = sorted(path.parent for path in root.rglob(records.RESULTS_FILE))
        found.extend(folders or sorted(root.rglob("*.json")))
    return found


def load_runs(roots: list[str]) -> list[Run]:
    return [read_run(path) for path in find_runs(roots)]
