"""XLA's own cost estimate of one dpbench physical-batch step, per ``dp.clipping``: what limits a ratio.

``python -m dpbench.bench.flops --workloads a,d`` compiles (does not run) the accumulation step of
``Trainer`` for ``dp=none`` and each clipping implementation and prints XLA's flop and bytes-accessed
estimates, with their ratio to ``dp=none``. Timing on a shared machine is noisy; these counts are
not, and say how far a DP step is from the non-private one in arithmetic alone.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from dpbench.bench import jax_side, workloads


def accumulate_cost(workload: workloads.Workload, clipping: str | None) -> dict:
    from dpbench.privacy.methods import make_method
    from dpbench.privacy.noise import iid_gaussian
    from dpbench.train import sharding
    from dpbench.train.loop import Trainer, gather_chunks

    method = make_method(jax_side.dp_config(workload, clipping))
    model = jax_side.Model(workload, frozen_labels=method.frozen_labels)
    mesh = sharding.make_mesh()
    trainer = Trainer(
        model.losses_fn,
        method,
        jax_side.make_optimizer(workload),
        mesh,
        iid_gaussian(method.clip_norm or 1.0, jax.random.PRNGKey(0)) if method.private else None,
        workload.batch_size,
    )
    state = trainer.init(model.trainable)
    frozen = sharding.put_replicated(model.frozen, mesh)
    batch, mask = gather_chunks(model.batch, np.arange(workload.batch_size), workload.physical_batch_size)[0]
    batch = sharding.put_batch(batch, mesh)
    mask = jax.device_put(mask, sharding.batch_sharding(mesh))
    acc = trainer.zero_accumulator(state.trainable, frozen, batch, mask)
    compiled = trainer.accumulate.lower(acc, state.trainable, frozen, batch, mask).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes": float(cost.get("bytes accessed", float("nan"))),
        "temp_mb": getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="a,d")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    clippings = jax_side.available_clippings()
    for key in args.workloads.split(","):
        workload = workloads.get(key.strip(), args.quick)
        print(f"({workload.key}) {workload.title}: one physical batch of {workload.physical_batch_size}")
        print("| dp | GFLOP | vs none | GB accessed | vs none | XLA temp buffers |")
        print("|---|---|---|---|---|---|")
        base = None
        for clipping in (None, *clippings):
            cost = accumulate_cost(workload, clipping)
            base = base or cost
            name = "none" if clipping is None else clipping
            print(
                f"| {name} | {cost['flops'] / 1e9:.2f} | {cost['flops'] / base['flops']:.2f}x "
                f"| {cost['bytes'] / 1e9:.2f} | {cost['bytes'] / base['bytes']:.2f}x "
                f"| {cost['temp_mb']:.0f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
