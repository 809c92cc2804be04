"""``python -m dpbench.bench --device gpu`` (``make bench-gpu``): the DP step on one accelerator, one table.

Cells: every workload of ``workloads.accelerator_workloads`` (Gemma 3 1B- and 4B-shaped decoders
with random weights + LoRA r32 in bfloat16 at sequence 512; a RoBERTa-base-shaped encoder, full
fine-tuning) times every variant (``dp=none``; ``dp.clipping`` = per_example, ghost, bookkeeping;
PyTorch non-private and Opacus ghost on CUDA where torch and opacus are installed), plus a smoke
run of the headline path: two logical steps of ``python -m dpbench +experiment=samsum_gemma
model=gemma3_270m_gguf`` on the device, evaluation and model saving included.

Each cell runs in its own worker process (``dpbench.bench.worker``: one warm-up step that
compiles, then timed steps; their median), so that the device's peak bytes in use
(``memory_stats()['peak_bytes_in_use']``, torch: ``max_memory_allocated``) are that cell's. Beside
them, one CPU process per workload asks ``dpbench.plan.memory_plan`` for its estimate of each dpbench
step, compiled by XLA:CPU exactly as ``python -m dpbench.plan compute=gpu`` would: measured / plan
checks the estimate users size their runs with (on a GPU the plans run on the host's cores while
the device measures; on a CPU after the cells). The parent never imports JAX (it would claim the
device's memory). Cells run one after the other within ``--budget-minutes``: a cell that cannot
start in time is reported, not run.

``--device cpu --quick`` runs the same code on tiny shapes (tiny_gemma3 in bfloat16, tiny_encoder),
several variants per process, compiled without XLA's optimisations: a check that the bench works,
whose times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dpbench.bench import harness, worker, workloads
from dpbench.bench.variants import BASELINE, BY_ID, Variant, package_versions

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"  # the SAMSum stand-in's 20 examples, in any clone
VARIANTS = (
    "dpbench-none",
    "dpbench-per_example",
    "dpbench-ghost",
    "dpbench-bookkeeping",
    "torch-nonprivate",
    "opacus-ghost",
)
DEFAULT_BUDGET_MINUTES = 9.5  # "under 10 minutes on one accelerator"
MIN_CELL_SECONDS = 20.0  # a cell is not started with less time than this left in the budget
GIB = 1024**3


@dataclasses.dataclass
class Cell:
    """One workload x variant: its measurement, or why there is none."""

    workload: workloads.Workload
    variant: Variant
    measurement: harness.Measurement | None = None
    note: str = ""  # skipped, not run, failed
    shared: bool = False  # measured in one process after other variants (memory counts differ)
    plan: dict | None = None  # dpbench.plan's parts and total (bytes), or {"error": ...}

    @property
    def seconds(self) -> float | None:
        m = self.measurement
        return statistics.median(m.step_seconds) if m and m.error is None and m.step_seconds else None

    @property
    def tokens_per_second(self) -> float | None:
        tokens = self.workload.batch_size * max(self.workload.seq_len, 1)
        return tokens / self.seconds if self.seconds else None

    @property
    def memory(self) -> tuple[float, str] | None:
        """(bytes, source): the device's peak bytes in use when the backend counts them, else the
        process's peak RSS (a CPU run; it includes the Python runtime and compilation)."""
        m = self.measurement
        if not self.seconds:
            return None
        if m.device_peak_bytes is not None:
            return float(m.device_peak_bytes), "device, cumulative" if self.shared else "device"
        if self.shared:  # wait4's peak is the whole process's: the worker's own per-variant counts
            return max(m.peak_rss_mb or 0.0, m.steps_peak_rss_mb or 0.0) * 2**20, "RSS"
        return m.peak_rss_mb * 2**20, "RSS"

    @property
    def plan_bytes(self) -> float | None:
        return float(self.plan["total"]) if self.plan and "total" in self.plan else None

    @property
    def measured_over_plan(self) -> float | None:
        """Measured / planned memory, where the measurement is the device's own count for this cell."""
        memory = self.memory
        if memory is None or memory[1] != "device" or not self.plan_bytes:
            return None
        return memory[0] / self.plan_bytes


def time_ratio(cell: Cell, cells: list[Cell]) -> float | None:
    """The cell's time over its framework's non-private cell on the same workload."""
    base_id = BASELINE[cell.variant.framework]
    base = next((c for c in cells if c.workload.key == cell.workload.key and c.variant.id == base_id), None)
    if base is None or not base.seconds or not cell.seconds:
        return None
    return cell.seconds / base.seconds


@dataclasses.dataclass
class Smoke:
    """Two logical steps of the headline experiment, end to end."""

    command: str
    data: str
    returncode: int | None = None
    wall_seconds: float | None = None
    steps: int | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    error: str = ""
    load_before: float | None = None
    load_after: float | None = None
    own_cores: float = 0.0  # the run's CPU time / wall time

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.steps == SMOKE_STEPS and not self.error

    @property
    def busy(self) -> bool:
        return harness.machine_busy(self.load_before, self.load_after, self.own_cores)


SMOKE_STEPS = 2


def smoke_data() -> tuple[list[str], str]:
    """Real SAMSum under the data root if there, else its ACLSum stand-in (the data root's, else the
    20 examples in tests/fixtures): (overrides, description)."""
    from dpbench.data.roots import default_data_root

    root = default_data_root()
    if root and (Path(root) / "samsum").is_dir():
        return [f"paths.data_root={root}"], f"SAMSum ({root}/samsum)"
    if root and (Path(root) / "samsum-aclsum").is_dir():
        return ["dataset=samsum_aclsum", f"paths.data_root={root}"], f"ACLSum stand-in ({root})"
    where = FIXTURE_DATA.relative_to(REPO)
    return ["dataset=samsum_aclsum", f"paths.data_root={FIXTURE_DATA}"], f"ACLSum stand-in ({where})"


def smoke_overrides(device: str, quick: bool, run_dir: Path, data: list[str]) -> list[str]:
    model = "tiny_gemma3" if quick else "gemma3_270m_gguf"
    return [
        "+experiment=samsum_gemma",
        f"model={model}",
        *data,
        f"compute={device}",
        f"runner.steps={SMOKE_STEPS}",
        "runner.epochs=null",
        "runner.batch_size=8",
        "compute.physical_batch_size=4",
        "runner.eval_before_training=false",
        "dataset.max_train_examples=64",
        "dataset.max_eval_examples=4",
        "dataset.max_new_tokens=8",
        "compute.eval_batch_size=4",
        "logger=none",
        "runner.progress_bar=false",
        "runner.resume=never",
        f"hydra.run.dir={run_dir}",
    ]


def run_smoke(device: str, quick: bool, log_dir: Path, env: dict, timeout: float) -> Smoke:
    data, described = smoke_data()
    run_dir = log_dir / "smoke"
    overrides = smoke_overrides(device, quick, run_dir, data)
    shown = [o for o in overrides if not o.startswith(("hydra.run.dir", "paths.data_root"))]
    smoke = Smoke("python -m dpbench " + " ".join(shown), described)
    start = time.perf_counter()
    returncode, usage, smoke.load_before, smoke.load_after = harness.run_process(
        [sys.executable, "-m", "dpbench", *overrides], log_dir / "smoke.log", timeout, env, cwd=log_dir
    )
    smoke.wall_seconds = time.perf_counter() - start
    smoke.own_cores = (usage.ru_utime + usage.ru_stime) / max(smoke.wall_seconds, 1e-9)
    smoke.returncode = returncode
    if returncode < 0:
        smoke.error = f"killed by signal {-returncode} after {smoke.wall_seconds:.0f} s (time budget)"
    results = run_dir / "results.json"
    if results.exists():
        record = json.loads(results.read_text())
        smoke.steps, smoke.metrics = record.get("steps"), record.get("metrics", {})
    elif not smoke.error:
        smoke.error = harness._last_line(log_dir / "smoke.log") or f"exit code {smoke.returncode}"
    return smoke


def probe_device(env: dict) -> dict:
    """What a worker will see (asked of a subprocess: the parent must not take the device):
    JAX's platform and device kind, whether torch has CUDA. Raises ``RuntimeError`` without a GPU."""
    probe = (
        "import importlib.util, json, jax\n"
        "d = jax.devices()[0]\n"
        "cuda = False\n"
        "if importlib.util.find_spec('torch'):\n"
        "    import torch\n"
        "    cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'platform': d.platform, 'kind': d.device_kind, 'count': jax.device_count(),"
        " 'torch_cuda': cuda}))\n"
    )
    env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"JAX sees no GPU ({last[:200]}); install the GPU build: pip install -e '.[gpu]'")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skip_reason(variant: Variant, device: str, torch_cuda: bool) -> str | None:
    reason = harness.skip_reason(variant, ("per_example", "ghost", "bookkeeping"))
    if reason:
        return reason
    if variant.runtime == "torch" and not harness.installed("torch"):
        return "`torch` is not installed"
    if variant.runtime == "torch" and device == "gpu" and not torch_cuda:
        return "torch has no CUDA here"
    return None


def child_env(device: str, quick: bool, log_dir: Path) -> dict:
    env = harness._child_env()
    env["JAX_PLATFORMS"] = "cuda" if device == "gpu" else "cpu"
    # Compilations that the plan repeats (and a second run of the bench) come from disk.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(log_dir / "jax_cache"))
    if quick:  # a check that the bench works: XLA:CPU's optimisations cost most of its time
        env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    return env


def process_groups(cells: list[Cell], isolation: str) -> list[list[Cell]]:
    """Cells in the order they run, grouped by process: one each (``cell``), or one process per
    workload and runtime (``workload``); JAX cells first, then torch cells."""
    ordered = [c for c in cells if c.variant.runtime == "jax"] + [
        c for c in cells if c.variant.runtime != "jax"
    ]
    if isolation == "cell":
        return [[c] for c in ordered]
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in ordered:
        groups.setdefault((cell.variant.runtime, cell.workload.key), []).append(cell)
    return list(groups.values())


def run_group(group: list[Cell], device: str, quick: bool, steps, log_dir: Path, env: dict, timeout: float):
    """One worker process for the group's variants (one workload); fills each cell's measurement."""
    key = group[0].workload.key
    ids = ",".join(c.variant.id for c in group)
    log_path = log_dir / f"{key}_{ids.replace(',', '+')}.log"
    out = log_path.with_suffix(".json")
    args = ["--workload", key, "--variant", ids, "--out", str(out), "--device", device]
    args += (["--quick"] if quick else []) + (["--steps", str(steps)] if steps else [])
    args += worker.shape_args(group[0].workload)  # the cell's shape, a resized workload's too (scaling)
    returncode, usage, load_before, load_after = harness.run_worker(args, log_path, timeout, env)
    results = json.loads(out.read_text()) if out.exists() else []
    results = {r["variant"]: r for r in (results if isinstance(results, list) else [results])}
    for cell in group:
        cell.shared = len(group) > 1
        m = harness.Measurement(cell.variant.id, 0, peak_rss_mb=usage.ru_maxrss / 1024)
        m.load_before, m.load_after = load_before, load_after
        result = results.get(cell.variant.id)
        if result is None or "error" in result:
            m.error = (result or {}).get("error") or harness._last_line(log_path) or f"exit code {returncode}"
            if returncode < 0:
                m.error = f"killed by signal {-returncode} (time budget {timeout:.0f} s, or out of memory)"
        else:
            harness.fill_from_worker(m, result)
            if cell.shared:
                m.peak_rss_mb = max(result.get("warmup_peak_rss_mb") or 0.0, m.steps_peak_rss_mb or 0.0)
        cell.measurement = m


def run_plans(cells: list[Cell], device: str, quick: bool, log_dir: Path, env: dict, timeout: float) -> None:
    """``dpbench.plan``'s estimate for each dpbench cell of one workload, in one XLA:CPU process."""
    planned = [c for c in cells if c.variant.framework == "dpbench"]
    if not planned:
        return
    key = planned[0].workload.key
    log_path = log_dir / f"plan_{key}.log"
    out = log_path.with_suffix(".json")
    args = ["--workload", key, "--variant", ",".join(c.variant.id for c in planned), "--out", str(out)]
    args += ["--device", device, "--plan-only"] + (["--quick"] if quick else [])
    returncode, *_ = harness.run_worker(args, log_path, timeout, {**env, "JAX_PLATFORMS": "cpu"})
    results = json.loads(out.read_text()) if out.exists() else []
    results = {r["variant"]: r for r in (results if isinstance(results, list) else [results])}
    for cell in planned:
        result = results.get(cell.variant.id) or {}
        if "plan" in result:
            cell.plan = {**result["plan"], "seconds": result["plan_seconds"]}
        else:
            error = result.get("error") or harness._last_line(log_path) or f"exit code {returncode}"
            cell.plan = {"error": "not finished in the time budget" if returncode < 0 else error}


def start_plans(cells: list[Cell], device: str, quick: bool, log_dir: Path, env: dict, timeout: float):
    """``run_plans`` for every workload, one thread each (they wait on subprocesses); join them."""
    by_workload: dict[str, list[Cell]] = {}
    for cell in cells:
        by_workload.setdefault(cell.workload.key, []).append(cell)
    threads = [
        threading.Thread(target=run_plans, args=(group, device, quick, log_dir, env, timeout), daemon=True)
        for group in by_workload.values()
    ]
    for thread in threads:
        thread.start()
    return threads


def _bytes_text(value: float) -> str:
    """
    >>> _bytes_text(3 * 2**30), _bytes_text(5 * 2**20)
    ('3.00 GiB', '5.0 MiB')
    """
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _load_text(before: float | None, after: float | None, busy: bool) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:.2f} -> {after:.2f}" + (f" {harness.BUSY_MARK}" if busy else "")


def render_table(cells: list[Cell], smoke: Smoke | None, versions: dict) -> str:
    lines = [
        "| workload | variant | tokens / s | s / step | vs own non-private | peak memory | plan | "
        "measured / plan | 1-min load before -> after | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        label = cell.variant.label.format_map({k: v or "?" for k, v in versions.items()})
        m = cell.measurement
        if not cell.seconds:
            note = cell.note or f"failed: {m.error}"
            load = _load_text(m.load_before, m.load_after, False) if m else "-"
            lines.append(f"| {cell.workload.key} | {label} | | | | | | | {load} | {note} |")
            continue
        memory = cell.memory
        plan = cell.plan or {}
        ratio = time_ratio(cell, cells)
        texts = [
            cell.workload.key,
            label,
            f"{cell.tokens_per_second:,.0f}",
            f"{cell.seconds:.3f}",
            "-" if ratio is None else f"{ratio:.2f}x",
            f"{_bytes_text(memory[0])} ({memory[1]})",
            _bytes_text(plan["total"]) if "total" in plan else (f"failed: {plan['error']}" if plan else "-"),
            "-" if cell.measured_over_plan is None else f"{cell.measured_over_plan:.2f}x",
            _load_text(m.load_before, m.load_after, m.busy),
            cell.note,
        ]
        lines.append("| " + " | ".join(texts) + " |")
    if smoke is not None:
        if smoke.passed:
            rouge = smoke.metrics.get("eval/rougeL")
            result = f"passed: {smoke.steps} logical steps" + (
                f", ROUGE-L {rouge:.3f} on {smoke.metrics.get('eval/examples')} examples"
                if rouge is not None
                else ""
            )
        else:
            result = f"FAILED: {smoke.error or f'exit code {smoke.returncode}, steps {smoke.steps}'}"
        lines.append(
            f"| samsum_gemma smoke | `{smoke.command}` | | {smoke.wall_seconds:.0f} s in all | | | | | "
            f"{_load_text(smoke.load_before, smoke.load_after, smoke.busy)} | {result}; data: {smoke.data} |"
        )
    return "\n".join(lines)


def footnotes(cells: list[Cell], smoke: Smoke | None) -> list[str]:
    notes = [
        "tokens / s: logical batch x sequence length / median s per logical step (after a compiling "
        "warm-up step). vs own non-private: the same framework's non-private step on the same workload.",
        "peak memory: the process's peak bytes in use on the device (JAX `memory_stats()`, torch "
        "`max_memory_allocated`) when it counts them, else its peak RSS (CPU; with the Python runtime and "
        "compilation). plan: `dpbench.plan.memory_plan`'s per-device total for the same step, compiled "
        "by XLA:CPU as `python -m dpbench.plan` does; measured / plan only against the device's count.",
    ]
    if any(c.shared for c in cells):
        notes.append(
            "Several variants per process (`--isolation workload`): device counts are cumulative "
            "over the process, RSS peaks are per variant."
        )
    notes += [
        f"`{w.key}`: {w.title}; {w.describe()}." for w in {c.workload.key: c.workload for c in cells}.values()
    ]
    if any(c.seconds and c.measurement.busy for c in cells) or (smoke is not None and smoke.busy):
        notes.append(harness.busy_footnote())
    return notes


def render(cells: list[Cell], smoke: Smoke | None, header: dict) -> str:
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in header["versions"].items())
    isolation = "one process per cell" if header["isolation"] == "cell" else "one process per workload"
    return "\n".join(
        [
            f"Command: `{header['command']}`; started {header['started']}, {header['wall_seconds'] / 60:.1f} "
            f"min; checkout {header['commit']}.  ",
            f"Device: {header['device']}. Machine: {header['machine']}. Versions: {versions}.  ",
            f"{isolation}, a warm-up step then {header['steps']} timed steps; "
            + (
                f"budget {header['budget_minutes']:g} min." if header["budget_minutes"] else "no time budget."
            ),
            "",
            render_table(cells, smoke, header["versions"]),
            "",
            *(f"- {note}" for note in footnotes(cells, smoke)),
        ]
    )


def raw_record(cells: list[Cell], smoke: Smoke | None, header: dict) -> dict:
    return {
        "header": header,
        "cells": [
            {
                "workload": c.workload.key,
                "workload_shape": dataclasses.asdict(c.workload),
                "variant": c.variant.id,
                "note": c.note,
                "shared_process": c.shared,
                "seconds_per_step": c.seconds,
                "tokens_per_second": c.tokens_per_second,
                "time_ratio_to_own_nonprivate": time_ratio(c, cells),
                "memory_bytes": c.memory[0] if c.memory else None,
                "memory_source": c.memory[1] if c.memory else None,
                "plan": c.plan,
                "measured_over_plan": c.measured_over_plan,
                "busy": bool(c.measurement and c.measurement.busy),
                "measurement": dataclasses.asdict(c.measurement) if c.measurement else None,
            }
            for c in cells
        ],
        "smoke": dataclasses.asdict(smoke) if smoke else None,
    }


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineErrors(
        prog="python -m dpbench.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--device", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (tiny_gemma3, tiny_encoder)")
    keys = ", ".join(workloads.accelerator_workloads(quick=True))
    parser.add_argument("--workloads", default=None, help=f"comma-separated subset of {keys} (default: all)")
    parser.add_argument(
        "--variants", default=None, help="comma-separated (default: " + ",".join(VARIANTS) + ")"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per cell (default: per workload)"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help=f"cells not started past this (default {DEFAULT_BUDGET_MINUTES} on gpu, none on cpu)",
    )
    parser.add_argument(
        "--isolation",
        choices=("cell", "workload"),
        default=None,
        help="a process per cell (default; exact device peaks) or per workload (default with --quick)",
    )
    parser.add_argument("--no-smoke", action="store_true", help="skip the samsum_gemma smoke run")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="worker logs, bench_gpu.md and bench_gpu.json"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one process is killed")
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> tuple[list[workloads.Workload], list[Variant]]:
    """The workloads and variants asked for; ``ValueError`` naming the allowed values."""
    table = workloads.accelerator_workloads(args.quick)
    keys = [k.strip() for k in (args.workloads or ",".join(table)).split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"--workloads: {', '.join(unknown)} not known; choose from {', '.join(table)}")
    ids = [i.strip() for i in (args.variants or ",".join(VARIANTS)).split(",") if i.strip()]
    unknown = [i for i in ids if i not in BY_ID]
    if unknown:
        raise ValueError(f"--variants: {', '.join(unknown)} not known; choose from {', '.join(BY_ID)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps}: give at least 1")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes={args.budget_minutes}: give a positive number")
    return [table[k] for k in keys], [BY_ID[i] for i in ids]


def main(argv: list[str], command: str, echo=print) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a bad option (one line, status 2)
        return int(done.code or 0)
    try:
        chosen_workloads, variants = select(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dpbench-bench-gpu-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(args.device, args.quick, log_dir)
    device, torch_cuda = "CPU (XLA:CPU)", False
    if args.device == "gpu":
        try:
            probe = probe_device(env)
        except RuntimeError as error:
            print(f"error: --device gpu: {error}", file=sys.stderr)
            return 2
        device, torch_cuda = (
            f"{probe['count']} x {probe['kind']} (JAX {probe['platform']})",
            probe["torch_cuda"],
        )
    budget_minutes = args.budget_minutes or (DEFAULT_BUDGET_MINUTES if args.device == "gpu" else None)
    deadline = time.monotonic() + budget_minutes * 60 if budget_minutes else float("inf")
    isolation = args.isolation or ("workload" if args.quick else "cell")
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()

    cells = [Cell(w, v) for w in chosen_workloads for v in variants]
    for cell in cells:
        cell.note = skip_reason(cell.variant, args.device, torch_cuda) or ""
        if cell.note:
            echo(f"skipping {cell.workload.key} {cell.variant.id}: {cell.note}")
    measured = [c for c in cells if not c.note]
    plan_timeout = max(min(args.timeout * 4, deadline - time.monotonic()), 1.0)
    # On a GPU the plans compile on the host's cores while the device measures; on a CPU they would
    # compete with the measured steps for the cores, so they wait until the cells are done.
    plans = (
        start_plans(measured, args.device, args.quick, log_dir, env, plan_timeout)
        if args.device == "gpu"
        else []
    )
    smoke = None
    if not args.no_smoke:  # first: the headline path either works on this device or the table says so
        echo("smoke: two steps of +experiment=samsum_gemma ...")
        smoke = run_smoke(
            args.device, args.quick, log_dir, env, min(args.timeout, deadline - time.monotonic())
        )
        echo(f"smoke: {'passed' if smoke.passed else 'FAILED: ' + smoke.error} in {smoke.wall_seconds:.0f} s")
    for group in process_groups(measured, isolation):
        left = deadline - time.monotonic()
        if left < MIN_CELL_SECONDS:
            for cell in group:
                cell.note = f"not run: the {budget_minutes:g}-minute budget was spent (--budget-minutes)"
            continue
        run_group(group, args.device, args.quick, args.steps, log_dir, env, min(args.timeout, left))
        for cell in group:
            shown = f"{cell.seconds:.3f} s/step" if cell.seconds else cell.measurement.error
            echo(f"{cell.workload.key} {cell.variant.id}: {shown}")
    if args.device != "gpu":
        plans = start_plans(
            [c for c in measured if c.seconds], args.device, args.quick, log_dir, env, args.timeout
        )
    for thread in plans:
        thread.join()
    header = {
        "command": command,
        "started": started,
        "wall_seconds": time.perf_counter() - start,
        "commit": harness.git_commit(),
        "device": device,
        "machine": harness.machine_description(),
        "versions": package_versions(),
        "isolation": isolation,
        "steps": args.steps or "per-workload",
        "budget_minutes": budget_minutes,
        "quick": args.quick,
    }
    if not args.steps:
        header["steps"] = "/".join(sorted({str(w.timed_steps) for w in chosen_workloads}))
    text = render(cells, smoke, header)
    (log_dir / "bench_gpu.md").write_text(text + "\n")
    (log_dir / "bench_gpu.json").write_text(json.dumps(raw_record(cells, smoke, header), indent=1))
    echo(text)
    echo(f"logs, bench_gpu.md and bench_gpu.json (raw numbers): {log_dir}")
    return 0
