"""``make bench``: cost of privacy for one logical step, as a multiple of non-private training.

Times the jitted step of the MNIST CNN (random data, batch 256 by default) with per-example
clipping (``dp.method=vanilla``) and without (``none``), on the devices JAX sees, and prints a
Markdown table. Compare with the "cost of privacy" rows in ../shared/ANCHORS.md (6.1x measured for
vmap per-example gradients on a 2-core CPU). Timings depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from dpbench.models.cnn import CNN
from dpbench.privacy.methods import GradientMethod
from dpbench.train import sharding
from dpbench.train.loop import Trainer, gather_chunks, merge_params, split_params


def time_steps(method: GradientMethod, batch_size: int, physical_batch_size: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    data = {
        "image": rng.uniform(size=(batch_size, 28, 28, 1)).astype(np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    module = CNN()
    params = module.init(jax.random.PRNGKey(0), data["image"][:1])["params"]

    def losses_fn(trainable, batch, frozen):
        logits = module.apply({"params": merge_params(trainable, frozen)}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    mesh = sharding.make_mesh()
    trainer = Trainer(losses_fn, method, optax.sgd(0.1, momentum=0.9), mesh, 1.0, batch_size)
    trainable, frozen = split_params(params, lambda path: True)
    state = trainer.init(trainable)
    chunks = gather_chunks(data, np.arange(batch_size), physical_batch_size)
    trainer.logical_step(state, frozen, chunks, jax.random.PRNGKey(0))  # compile
    jax.block_until_ready(state.trainable)
    start = time.perf_counter()
    for i in range(repeats):
        trainer.logical_step(state, frozen, chunks, jax.random.PRNGKey(i))
    jax.block_until_ready(state.trainable)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--physical-batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    nonprivate = time_steps(
        GradientMethod("none", None), args.batch_size, args.physical_batch_size, args.repeats
    )
    private = time_steps(
        GradientMethod("vanilla", 0.1), args.batch_size, args.physical_batch_size, args.repeats
    )
    print(
        f"MNIST CNN, logical batch {args.batch_size}, physical {args.physical_batch_size}, "
        f"{len(jax.devices())} x {jax.devices()[0].platform}"
    )
    print("| method | s / logical step | examples / s | time vs non-private |")
    print("|---|---|---|---|")
    for name, seconds in (("none", nonprivate), ("vanilla (vmap per-example)", private)):
        print(f"| {name} | {seconds:.3f} | {args.batch_size / seconds:.0f} | {seconds / nonprivate:.1f}x |")


if __name__ == "__main__":
    main()
