"""Sweeps (``python -m dpbench -m ...``) that check every job first and survive a failing one.

:class:`SweepCallback` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``):

- ``on_multirun_start``: composes every job of the grid (Hydra's own expansion of the sweep's
  ``hydra.sweeper.params`` and the command line) and runs the start-up checks on each; a bad job
  refuses the whole grid in one line naming it, before the first job starts.
- ``on_job_end``: records each job as done, skipped (already complete in its folder) or failed
  (with its one-line reason); a failed job does not stop the others (``dpbench.__main__`` raises a
  plain exception for it instead of exiting).
- at the end, :func:`print_summary` (called by the CLI) prints the counts, the failed jobs, the
  sweep's runs as ε spent against their metric (:func:`epsilon_table`) and the report command.

A sweep's folder is stable: ``conf/config.yaml`` names it ``multirun/${dpbench_sweep_name:...}``
(``dpbench.sweep_names.sweep_name``, from the command's overrides), and each
``conf/sweep/<name>.yaml`` names its own ``multirun/<name>``. Re-running the same command finds its
finished jobs and skips them.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict


@dataclasses.dataclass
class JobOutcome:
    overrides: str
    status: str  # done | skipped | failed
    reason: str = ""


OUTCOMES: list[JobOutcome] = []
SWEEP_DIR: list[str] = []
SKIPPED: list[bool] = []  # set by the job when its folder already held a complete record


class JobFailed(Exception):
    """A job of a sweep refused or failed at run time: recorded, and the sweep goes on."""


def grid(config: DictConfig) -> list[list[str]]:
    """The jobs (override lists) this sweep will run, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = [*params, *config.hydra.overrides.task]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed = parser.parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a sweep varies (``key=a,b`` on the command line or in ``hydra.sweeper.params``)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed = parser.parse_overrides([*params, *config.hydra.overrides.task])
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from dpbench import config as config_lib

        OUTCOMES.clear()
        SWEEP_DIR[:] = [str(config.hydra.sweep.dir)]
        if config.hydra.sweeper.get("_target_", "").split(".")[-1] != "BasicSweeper":
            return  # other sweepers choose their jobs as they go
        loader = GlobalHydra.instance().config_loader()
        jobs = grid(config)
        for overrides in jobs:
            job_cfg = loader.load_sweep_config(config, list(overrides))
            with open_dict(job_cfg):
                del job_cfg["hydra"]  # what the job's task function receives
                job_cfg.paths.output_dir = "(the job's folder)"  # ${hydra:runtime...}: set when it runs
            try:
                config_lib.validate_static(job_cfg)
            except config_lib.SETTING_ERRORS as error:
                keys = swept_keys(config)
                swept = " ".join(o for o in overrides if o.split("=", 1)[0] in keys)
                # SystemExit, not an Exception: Hydra turns a callback's exceptions into warnings.
                print(f"error: the sweep's job {swept or '(no swept key)'}: {error}", file=sys.stderr)
                sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return

        overrides = " ".join(config.hydra.overrides.task)
        if job_return.status == JobStatus.COMPLETED:
            OUTCOMES.append(JobOutcome(overrides, "skipped" if SKIPPED and SKIPPED[-1] else "done"))
        else:
            reason = " ".join(str(job_return._return_value).split())[:300]
            OUTCOMES.append(JobOutcome(overrides, "failed", reason))
        SKIPPED.clear()


def print_summary(out=sys.stderr) -> int:
    """Print the sweep's outcome; returns the exit status (0: no job failed, 1: some failed)."""
    if not OUTCOMES:
        return 0
    counts = {s: sum(o.status == s for o in OUTCOMES) for s in ("done", "skipped", "failed")}
    done, skipped, failed = counts["done"], counts["skipped"], counts["failed"]
    print(f"sweep: {done} done, {skipped} skipped (complete already), {failed} failed", file=out)
    for outcome in OUTCOMES:
        if outcome.status == "failed":
            print(f"  failed: {outcome.overrides}: {outcome.reason}", file=out)
    if SWEEP_DIR:
        for line in epsilon_table(Path(SWEEP_DIR[0])):
            print(line, file=out)
        print(f"report: python -m dpbench.report {Path(SWEEP_DIR[0])} --plot", file=out)
    return 1 if counts["failed"] else 0


def epsilon_table(sweep_dir: Path) -> list[str]:
    """The sweep's finished runs, non-private first then by ε spent: what privacy cost in utility.

    Every run folder under ``sweep_dir`` counts, jobs of earlier invocations included (a re-run
    skips them), so the table is the whole grid so far.
    """
    from dpbench.report.runs import load_runs
    from dpbench.report.table import fmt_metric

    try:
        runs = load_runs([str(sweep_dir)]) if sweep_dir.is_dir() else []
    except (OSError, ValueError):  # a torn record: the report command says which
        return []
    if not runs:
        return []
    runs.sort(key=lambda run: (run.private, run.epsilon or 0.0))
    metric = runs[0].primary_metric
    rows = [("ε spent", metric.split("/")[-1], "run")]
    for run in runs:
        epsilon = f"{run.epsilon:.4g}" if run.private else "∞ (non-private)"
        rows.append((epsilon, fmt_metric(metric, run.metrics.get(metric)), Path(run.path).name))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
