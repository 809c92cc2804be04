"""What a run leaves behind: ``results.json`` (a versioned ``RunRecord``) and ``history.jsonl``.

``results.json`` is written atomically (a temporary file in the same folder, then ``os.replace``),
so a reader never sees a truncated record, and ``complete`` is true only in the final write.
Readers (``dpbench.report``, tests, sweeps) go through :func:`load_record`, never raw keys.

``history.jsonl`` gets one JSON line per logged training step (``kind: "train"``) and per
evaluation (``kind: "eval"``, step 0 = before training) as training goes. A resumed run first
drops the lines written after its checkpoint, then appends; a (kind, step) pair is never written
twice, so the file reads the same as for an uninterrupted run.

Schema history:
- 1: first versioned schema (the keys of the unversioned results.json, plus ``schema_version``,
  ``complete``, ``task``, ``resumed_at``, ``reproducibility``, ``final_params_sha256``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.jsonl"


@dataclasses.dataclass
class RunRecord:
    """``results.json``: one run's final metrics, privacy claim, provenance and config.

    Fields of a DP run hold nothing computed from the training data without noise unless the run
    opted in (``runner.release_nonprivate_stats=true``); ``privacy["released_nonprivate_statistics"]``
    lists what was released.
    """

    dataset: str  # as labelled, stand-ins included, e.g. "SST-2 (RT stand-in)"
    data_source: str  # where the examples came from, e.g. "idx:/data/mnist"
    weights_source: str
    task: str  # classification | summarization
    method: str  # dp.method
    metrics: dict[str, Any]  # the final evaluation (evaluation split only)
    history: list[dict[str, Any]]  # every evaluation during training, with its step
    steps: int  # logical steps trained (one noise draw each)
    sampling_rate: float
    train_examples: int  # n, as the accountant saw it
    epsilon: float | None  # spent after ``steps`` (None: non-private)
    delta: float | None
    noise_multiplier: float | None
    privacy: dict[str, Any]  # mechanism, accountant, neighbouring relation, released statistics
    reproducibility: dict[str, Any]  # how batches and noise keys derive from the seed
    config: dict[str, Any]  # the composed config
    schema_version: int = SCHEMA_VERSION
    complete: bool = True
    baseline_metrics: dict[str, Any] | None = None  # evaluation before training, if asked for
    resumed_at: list[int] = dataclasses.field(default_factory=list)  # steps this run resumed from
    final_params_sha256: str | None = None  # of the trainable parameters: equal runs, equal digests
    train_seconds: float | None = None  # the training loop's, over every session (to its last checkpoint)
    wall_seconds: float | None = None  # the whole job's, over every session the same way
    devices: int | None = None
    data_preparation: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    samples: list[dict[str, str]] | None = None  # summarisation: a few generated evaluation summaries
    audit: dict[str, Any] | None = None
    # A trial that python -m dpbench.tune released (its released/results.json): the total ε with the
    # tuning and how the trials were drawn; ``metrics`` are then the test split's.
    tuning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunRecord:
        """A record from its JSON form; unversioned (pre-schema) records are read as version 0."""
        version = values.get("schema_version", 0)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"results.json has schema_version={version}; this dpbench reads up to {SCHEMA_VERSION}"
            )
        values = dict(values)
        if version == 0:
            values.setdefault("task", "summarization" if "samples" in values else "classification")
            values.setdefault("reproducibility", {})
            values.setdefault("history", [])
            values["schema_version"] = 0
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def flatten(values: Any, sep: str = ".", prefix: str = "") -> dict:
    """Nested dicts as one level of ``sep``-joined names.

    >>> flatten({"dp": {"epsilon": 1.0, "sampler": "poisson"}, "seed": 0})
    {'dp.epsilon': 1.0, 'dp.sampler': 'poisson', 'seed': 0}
    """
    if not isinstance(values, dict):
        return {prefix: values}
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        flat.update(flatten(value, sep, name) if isinstance(value, dict) else {name: value})
    return flat


# The command of a job run from inside another command (a trial of ``python -m dpbench.tune``), whose
# Hydra overrides are the outer command's, not the job's.
_JOB_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_command", default=None)


@contextlib.contextmanager
def job_command(command: str):
    """Record ``command`` as what reruns the jobs run inside this block (:func:`command_line`)."""
    token = _JOB_COMMAND.set(command)
    try:
        yield
    finally:
        _JOB_COMMAND.reset(token)


def command_line() -> str:
    """``python -m dpbench`` with this job's Hydra overrides (what reruns it, sweep or not)."""
    from hydra.core.hydra_config import HydraConfig

    if _JOB_COMMAND.get() is not None:
        return _JOB_COMMAND.get()
    if not HydraConfig.initialized():  # built from a composed config (tests, notebooks)
        return "python -m dpbench (config composed in Python, no command line)"
    overrides = HydraConfig.get().overrides.task
    return " ".join(["python -m dpbench", *(shlex.quote(o) for o in overrides)])


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """Write JSON to ``path`` through a temporary file and ``os.replace``: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(value, indent=2, default=json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def write_record(output_dir: str | Path, record: RunRecord) -> Path:
    return write_json_atomic(Path(output_dir) / RESULTS_FILE, record.to_dict())


def load_record(path: str | Path) -> RunRecord:
    """The record in ``path`` (a results.json file or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return RunRecord.from_dict(json.loads(path.read_text()))


def json_default(value):
    # NumPy / JAX scalars and arrays from metrics.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def params_sha256(tree: dict) -> str:
    """Digest of a flat ``{path: array}`` parameter dict (paths sorted): bit-identical iff equal."""
    digest = hashlib.sha256()
    for path in sorted(tree):
        array = np.asarray(tree[path])
        digest.update("/".join(map(str, path)).encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class History:
    """``history.jsonl``: one line per logged step or evaluation, appended as training goes.

    ``resume_step=None`` starts a new file; otherwise lines after ``resume_step`` (written by the
    interrupted run after its last checkpoint) and any torn last line are dropped first.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines: list[dict] = []
        if resume_step is not None and self.path.exists():
            for text in self.path.read_text().splitlines():
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a line torn by kill -9
                if isinstance(line, dict) and line.get("step", resume_step + 1) <= resume_step:
                    self.lines.append(line)
        self._seen = {(line["kind"], line["step"]) for line in self.lines}
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        temporary.write_text("".join(json.dumps(line, default=json_default) + "\n" for line in self.lines))
        os.replace(temporary, self.path)

    def has(self, kind: str, step: int) -> bool:
        return (kind, step) in self._seen

    def append(self, kind: str, step: int, values: dict) -> bool:
        """Append one line unless (kind, step) is already there; True if written."""
        if (kind, step) in self._seen:
            return False
        line = {"kind": kind, "step": step, **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line, default=json_default) + "\n")
        self.lines.append(line)
        self._seen.add((kind, step))
        return True

    def of_kind(self, kind: str) -> list[dict]:
        """Lines of one kind, without the ``kind`` key, in step order."""
        lines = [
            {key: value for key, value in line.items() if key != "kind"}
            for line in self.lines
            if line["kind"] == kind
        ]
        return sorted(lines, key=lambda line: line["step"])


def read_history(path: str | Path) -> list[dict]:
    """Every complete line of a ``history.jsonl`` file (or of the one in a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines
