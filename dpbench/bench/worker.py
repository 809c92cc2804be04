"""One variant on one workload, in its own process: build, one warm-up step, timed steps, JSON out.

``python -m dpbench.bench.worker --workload a --variant dpbench-ghost --out result.json [--quick]``.
The parent reads this process's peak RSS from ``wait4``; the JSON carries the step times. Only
the framework the variant needs is imported (a torch variant never loads JAX, and vice versa).
``--list-clippings`` prints the ``dp.clipping`` values this checkout implements, as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from pathlib import Path

from dpbench.bench import workloads
from dpbench.bench.variants import BY_ID, Variant


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) since start, or since ``restart_peak_rss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def restart_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux >= 4.0), after handing freed heap back to the OS.

    The process peak includes one-off costs of the warm-up step (XLA compiling the step function
    can take hundreds of MB); the peak over the timed steps is the memory training itself holds.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_step(workload: workloads.Workload, variant: Variant):
    if variant.framework == "dpbench":
        from dpbench.bench import jax_side

        return jax_side.dpbench_step(workload, variant.clipping, variant.noise)
    if variant.id == "jax-nonprivate":
        from dpbench.bench import jax_side

        return jax_side.plain_jax_step(workload)
    if variant.id == "jax_privacy-clipped_grad":
        from dpbench.bench import jax_side

        return jax_side.jax_privacy_step(workload)
    from dpbench.bench import torch_side

    mode = {"torch-nonprivate": "nonprivate", "opacus-hooks": "hooks", "opacus-ghost": "ghost"}[variant.id]
    return torch_side.torch_step(workload, mode)


def measure(workload: workloads.Workload, variant: Variant, steps: int) -> dict:
    start = time.perf_counter()
    step, info = make_step(workload, variant)
    setup = time.perf_counter() - start
    rss_setup = rss_mb()
    start = time.perf_counter()
    step(0)  # compiles (JAX) / allocates; not timed
    first = time.perf_counter() - start
    # The count restarts below, and the kernel then forgets the earlier peak for wait4 too: keep it.
    warmup_peak = peak_rss_mb()
    restart_peak_rss()
    times, cpu_times = [], []
    for i in range(1, steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "step_seconds": times,
        # CPU time of all this process's threads: what the step consumed, whether or not other jobs
        # kept it waiting for a core (wall time on an oversubscribed machine mostly measures those).
        "step_cpu_seconds": cpu_times,
        "setup_seconds": setup,
        "first_step_seconds": first,
        "rss_after_setup_mb": rss_setup,
        "rss_end_mb": rss_mb(),
        "warmup_peak_rss_mb": warmup_peak,
        "steps_peak_rss_mb": peak_rss_mb(),
        "info": info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload")
    parser.add_argument("--variant")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out")
    parser.add_argument("--list-clippings", action="store_true")
    args = parser.parse_args(argv)
    if args.list_clippings:
        from dpbench.bench.jax_side import available_clippings

        print(json.dumps(list(available_clippings())))
        return 0
    workload = workloads.get(args.workload, args.quick)
    variant = BY_ID[args.variant]
    try:
        result = measure(workload, variant, args.steps or workload.timed_steps)
        code = 0
    except Exception as error:  # noqa: BLE001 - reported in the table, the other variants go on
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        code = 1
    Path(args.out).write_text(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
