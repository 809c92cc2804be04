"""Run in a subprocess with 4 fake CPU devices (see test_data_parallel.py); prints JSON."""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dpbench.models.cnn import CNN  # noqa: E402
from dpbench.privacy.batch_selection import PoissonSampler  # noqa: E402
from dpbench.privacy.methods import GradientMethod  # noqa: E402
from dpbench.privacy.noise import iid_gaussian  # noqa: E402
from dpbench.train import sharding  # noqa: E402
from dpbench.train.loop import Trainer, gather_chunks, merge_params, split_params  # noqa: E402

SIGMA, CLIP, BATCH, PHYSICAL = 1.1, 0.5, 16, 8


def main():
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    data = {
        "image": rng.uniform(size=(64, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 64).astype(np.int32),
    }
    module = CNN(num_classes=10)
    params = module.init(jax.random.PRNGKey(0), data["image"][:1])["params"]

    def losses_fn(trainable, batch, frozen):
        logits = module.apply({"params": merge_params(trainable, frozen)}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    sampler = PoissonSampler(64, BATCH, seed=0)
    out = {}
    # per_example on 1 and 4 devices; the fast exact implementations on 4 devices.
    for devices, clipping in ((1, "per_example"), (4, "per_example"), (4, "ghost"), (4, "bookkeeping")):
        method = GradientMethod("vanilla", clip_norm=CLIP, clipping=clipping)
        suffix = devices if clipping == "per_example" else f"{devices}_{clipping}"
        mesh = sharding.make_mesh(devices)
        trainer = Trainer(
            losses_fn, method, optax.sgd(0.1), mesh, iid_gaussian(SIGMA * CLIP, jax.random.PRNGKey(1)), BATCH
        )
        trainable, frozen = split_params(params, lambda p: True)
        frozen = sharding.put_replicated(frozen, mesh)
        # The clipped sum of one logical batch, noise off.
        chunks = gather_chunks(data, sampler.batch_indices(0), PHYSICAL)
        state = trainer.init(trainable)
        acc = None
        for batch, mask in chunks:
            batch = sharding.put_batch(batch, mesh)
            mask = jax.device_put(mask, sharding.batch_sharding(mesh))
            acc = acc if acc is not None else trainer.zero_accumulator(state.trainable, frozen, batch, mask)
            acc = trainer.accumulate(acc, state.trainable, frozen, batch, mask)
        grad_sum = acc[0]
        out[f"sum_{suffix}"] = [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(grad_sum)]
        out[f"sum_sharding_{suffix}"] = str(jax.tree_util.tree_leaves(grad_sum)[0].sharding)
        # Noise: finalize on a zero sum under this mesh, times the expected batch, has std σC.
        zeros = sharding.put_replicated(jax.tree_util.tree_map(jnp.zeros_like, grad_sum), mesh)
        noise_at_7 = iid_gaussian(SIGMA * CLIP, jax.random.PRNGKey(7))
        noisy, _ = jax.jit(
            functools.partial(Trainer(None, method, None, mesh, noise_at_7, BATCH).finalize, count=1.0)
        )(zeros, noise_state=noise_at_7.init(zeros))
        noise = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(noisy)]) * BATCH
        out[f"noise_std_{suffix}"] = float(noise.std())
        out[f"noise_size_{suffix}"] = int(noise.size)
        # Parameters after a few noisy logical steps, same seed.
        state = trainer.init(trainable)
        for step in range(3):
            chunks = gather_chunks(data, sampler.batch_indices(step), PHYSICAL)
            trainer.logical_step(state, frozen, chunks)
        out[f"params_{suffix}"] = [
            np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state.trainable)
        ]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
