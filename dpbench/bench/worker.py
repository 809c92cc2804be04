"""One variant on one workload, in its own process: build, one warm-up step, timed steps, JSON out.

``python -m dpbench.bench.worker --workload a --variant dpbench-ghost --out result.json [--quick]``.
The parent reads this process's peak RSS from ``wait4``; the JSON carries the step times. Only
the framework the variant needs is imported (a torch variant never loads JAX, and vice versa).
``--list-clippings`` prints the ``dp.clipping`` values this checkout implements, as JSON.

For the accelerator bench: ``--device gpu`` (torch on CUDA; JAX's platform comes from the parent's
``JAX_PLATFORMS``) records the device's peak bytes in use, ``--variant a,b,...`` measures several
variants one after the other in this process (a JSON list; each variant's RSS peak counted afresh),
and ``--plan-only`` measures nothing: ``dpbench.plan``'s memory estimate of each dpbench variant's step.
``--seq-len``, ``--batch-size`` and ``--physical-batch-size`` resize the workload (the cost curves of
``dpbench.bench.scaling``); :func:`shape_args` gives them for a workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path

from dpbench.bench import workloads
from dpbench.bench.variants import BY_ID, Variant
from dpbench.train import heap


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
    heap.release_freed()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_step(workload: workloads.Workload, variant: Variant, device: str = "cpu"):
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
    return torch_side.torch_step(workload, mode, "cuda" if device == "gpu" else "cpu")


def device_peak_bytes(variant: Variant) -> int | None:
    """The accelerator's peak bytes in use by this process (None on a CPU, which has no such count)."""
    if variant.runtime == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def measure(
    workload: workloads.Workload,
    variant: Variant,
    steps: int,
    device: str = "cpu",
    shared: bool = False,
) -> dict:
    if shared:  # the peak RSS of this variant, not of the ones before it in this process
        restart_peak_rss()
    start = time.perf_counter()
    step, info = make_step(workload, variant, device)
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
    steps_peak = peak_rss_mb()
    device_peak = device_peak_bytes(variant) if device == "gpu" else None
    del step  # the variant's buffers, before the next variant in this process
    gc.collect()
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
        "steps_peak_rss_mb": steps_peak,
        "device_peak_bytes": device_peak,
        "info": info,
    }


def memory_plan(workload: workloads.Workload, variant: Variant, device: str) -> dict:
    """``dpbench.plan``'s per-device estimate of the variant's step (``device``: the compute preset it
    plans for; the backend is this process's) and the seconds it took."""
    from dpbench.bench import jax_side

    start = time.perf_counter()
    parts = jax_side.memory_plan(workload, variant.clipping, device)
    return {"plan": parts, "plan_seconds": time.perf_counter() - start}


SHAPE_FIELDS = ("seq_len", "batch_size", "physical_batch_size")


def shape_args(workload: workloads.Workload) -> list[str]:
    """The worker's options that give it exactly this workload's shape (a resized table entry too)."""
    return [a for f in SHAPE_FIELDS for a in (f"--{f.replace('_', '-')}", str(getattr(workload, f)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload")
    parser.add_argument("--variant")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out")
    parser.add_argument("--list-clippings", action="store_true")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--plan-only", action="store_true", help="dpbench.plan's estimates, no measurement")
    for field in SHAPE_FIELDS:
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=None, help="resize the workload"
        )
    args = parser.parse_args(argv)
    if args.list_clippings:
        from dpbench.bench.jax_side import available_clippings

        print(json.dumps(list(available_clippings())))
        return 0
    workload = workloads.find(args.workload, args.quick)
    resized = {f: getattr(args, f) for f in SHAPE_FIELDS if getattr(args, f) is not None}
    workload = dataclasses.replace(workload, **resized)
    variant_ids = args.variant.split(",")
    results = []
    for variant_id in variant_ids:
        try:
            steps = args.steps or workload.timed_steps
            shared = len(variant_ids) > 1
            if args.plan_only:
                result = memory_plan(workload, BY_ID[variant_id], args.device)
            else:
                result = measure(workload, BY_ID[variant_id], steps, args.device, shared)
        except Exception as error:  # noqa: BLE001 - reported in the table, the other variants go on
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        results.append({"variant": variant_id, **result})
        Path(args.out).write_text(json.dumps(results if len(variant_ids) > 1 else results[0], indent=1))
    return 1 if len(variant_ids) == 1 and "error" in results[0] else 0


if __name__ == "__main__":
    sys.exit(main())
