"""Run in a subprocess with 8 fake CPU devices (tests/train/test_fsdp.py): ``python fsdp_check.py CASE...``.

A case is ``model:finetune:clipping:data:fsdp[:dtype[:remat]]``; for each it builds the model with its
weights placed by sharding rule on that mesh, then reports (as JSON on stdout) the clipped gradient sum
of one logical batch without noise, the parameters after three noisy logical steps (same keys), the
shardings and dtypes that matter. ``model`` is ``gemma``, ``encoder`` or ``cnn`` (the MNIST CNN on 8x8
images; every parameter trains: ``full`` shards its weights, Adam moments and gradient sums over
fsdp, any other ``finetune`` replicates them).

A case ``sensitivity:model:finetune:clipping:data:fsdp`` instead reports the remove-one sensitivity on
that mesh: for every row j of one physical batch of large-gradient examples (every one clipped), the
L2 norm of (clipped sum over the batch) - (clipped sum with row j masked out), over ``clip_norm``.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dpbench.models.cnn import CNN  # noqa: E402
from dpbench.models.encoder import EncoderModelConfig, RandomInitConfig, build_encoder  # noqa: E402
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3  # noqa: E402
from dpbench.privacy.batch_selection import PoissonSampler  # noqa: E402
from dpbench.privacy.methods import GradientMethod  # noqa: E402
from dpbench.privacy.noise import iid_gaussian  # noqa: E402
from dpbench.train import sharding  # noqa: E402
from dpbench.train.loop import Trainer, gather_chunks, merge_params, split_params  # noqa: E402

SIGMA, CLIP, BATCH, PHYSICAL, N = 0.8, 0.05, 16, 8, 48
SCALE = float(os.environ.get("FSDP_CHECK_SCALE", 3.0))  # sensitivity: inputs this large clip every example


def gemma(finetune: str, dtype: str, remat: str, placement):
    cfg = Gemma3ModelConfig(
        preset="tiny",
        random_init=True,
        tokenizer="bytes",
        lora_rank=4,
        lora_alpha=8,
        finetune=finetune,
        dtype=dtype,
        remat=remat,
    )
    bundle = build_gemma3(cfg, jax.random.PRNGKey(0), placement=placement)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(3, 261, (N, 20)).astype(np.int32),
        "attention_mask": (np.arange(20)[None] < rng.integers(8, 21, (N, 1))).astype(np.int32),
    }

    def losses_fn(trainable, batch, frozen):
        logits = bundle.apply_fn(merge_params(trainable, frozen), batch)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
        weights = batch["attention_mask"][:, 1:].astype(jnp.float32)
        return jnp.sum(nll * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0), {}

    return bundle, data, losses_fn


def encoder(finetune: str, dtype: str, remat: str, placement):
    del remat
    cfg = EncoderModelConfig(
        finetune=finetune,
        lora_rank=4,
        lora_alpha=8,
        dtype=dtype,
        random_init=RandomInitConfig(
            family="roberta",
            vocab_size=259,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            type_vocab_size=1,
        ),
    )
    bundle = build_encoder(cfg, jax.random.PRNGKey(0), placement=placement)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(3, 259, (N, 16)).astype(np.int32),
        "attention_mask": np.ones((N, 16), np.int32),
        "label": rng.integers(0, 2, N).astype(np.int32),
    }

    def losses_fn(trainable, batch, frozen):
        logits = bundle.apply_fn(merge_params(trainable, frozen), batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]), {}

    return bundle, data, losses_fn


class Bundle:
    def __init__(self, params, is_trainable):
        self.params, self.is_trainable = params, is_trainable


def cnn(finetune: str, dtype: str, remat: str, placement, scale: float = 1.0):
    """The MNIST CNN (dpbench/models/cnn.py) on 8x8 images; ``scale`` > 1 makes every gradient large."""
    del finetune, dtype, remat, placement  # every parameter trains; the trainer places them
    module = CNN(num_classes=10)
    rng = np.random.default_rng(0)
    data = {
        "image": (scale * rng.normal(size=(N, 8, 8, 1))).astype(np.float32),
        "label": rng.integers(0, 10, N).astype(np.int32),
    }
    params = module.init(jax.random.PRNGKey(0), data["image"][:1])["params"]

    def losses_fn(trainable, batch, frozen):
        logits = module.apply({"params": merge_params(trainable, frozen)}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    return Bundle(params, lambda path: True), data, losses_fn


MODELS = {"gemma": gemma, "encoder": encoder, "cnn": cnn}


def make_trainer(model, finetune, clipping, data_axis, fsdp_axis, dtype="float32", remat="none", **kwargs):
    data_axis, fsdp_axis = int(data_axis), int(fsdp_axis)
    mesh = sharding.make_mesh(data_axis * fsdp_axis, data_axis, fsdp_axis)
    placement = sharding.placement(mesh, None)
    bundle, data, losses_fn = MODELS[model](finetune, dtype, remat, placement, **kwargs)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    frozen = sharding.put_sharded(frozen, mesh, None)
    method = GradientMethod("vanilla", clip_norm=CLIP, clipping=clipping)
    trainer = Trainer(
        losses_fn,
        method,
        optax.adam(1e-2),
        mesh,
        iid_gaussian(SIGMA * CLIP, jax.random.PRNGKey(1)),
        BATCH,
        param_rules=None,
        gathered_at_use=getattr(bundle, "gathered_at_use", None),
    )
    if finetune == "full":  # the trainable weights, their Adam moments and gradient sums sharded too
        trainer.param_rules = sharding.DEFAULT_RULES
    return mesh, data, trainable, frozen, trainer


def sensitivity(model, *rest) -> dict:
    """The remove-one sensitivity on this mesh: ||S(B) - S(B')|| / C for every neighbour B' of one
    physical batch B of large-gradient examples (every one clipped, so the bound C is tight).

    S is the trainer's clipped sum. ``removed``: B' is B without example j, cut as the loop cuts it
    (``gather_chunks``: the later rows move up one, the last row is padding); a per-example gradient
    that depended on where its row sits (which device) would break the bound here. ``masked``: row j
    kept in place with its mask off.
    """
    mesh, data, trainable, frozen, trainer = make_trainer(model, *rest, scale=SCALE)
    state = trainer.init(trainable)
    rows = np.arange(PHYSICAL)

    def clipped_sum(chunks):
        ((batch, mask),) = chunks
        batch, mask = sharding.put_batch(batch, mesh), sharding.put_rows(mask, mesh)
        acc = trainer.zero_accumulator(state.trainable, frozen, batch, mask)
        grad_sum, stats = jax.device_get(trainer.accumulate(acc, state.trainable, frozen, batch, mask))
        flat = np.concatenate([np.asarray(grad_sum[p], np.float64).ravel() for p in sorted(grad_sum)])
        return flat, stats

    total, stats = clipped_sum(gather_chunks(data, rows, PHYSICAL))
    removed, masked = [], []
    for row in rows:
        without, _ = clipped_sum(gather_chunks(data, np.delete(rows, row), PHYSICAL))
        removed.append(float(np.linalg.norm(total - without) / CLIP))
        batch = {k: v[rows] for k, v in data.items()}
        without, _ = clipped_sum([(batch, rows != row)])
        masked.append(float(np.linalg.norm(total - without) / CLIP))
    return {
        "removed": removed,
        "masked": masked,
        "count": float(stats["count"]),
        "clipped_fraction": float(stats["clipped_fraction_sum"]) / float(stats["count"]),
        "mean_norm_over_clip": float(stats["grad_norm_sum"]) / float(stats["count"]) / CLIP,
    }


def run_case(case: str) -> dict:
    if case.startswith("sensitivity:"):
        return sensitivity(*case.split(":")[1:])
    model, finetune, clipping, data_axis, fsdp_axis, *rest = case.split(":")
    dtype = rest[0] if rest else "float32"
    remat = rest[1] if len(rest) > 1 else "none"
    mesh, data, trainable, frozen, trainer = make_trainer(
        model, finetune, clipping, data_axis, fsdp_axis, dtype, remat
    )
    sampler = PoissonSampler(N, BATCH, seed=0)
    state = trainer.init(trainable)
    acc = None
    for batch, mask in gather_chunks(data, sampler.batch_indices(0), PHYSICAL):
        batch = sharding.put_batch(batch, mesh)
        mask = sharding.put_rows(mask, mesh)
        acc = acc if acc is not None else trainer.zero_accumulator(state.trainable, frozen, batch, mask)
        acc = trainer.accumulate(acc, state.trainable, frozen, batch, mask)
    grad_sum, stats = jax.device_get(acc)
    initial = jax.device_get(state.trainable)
    for step in range(3):
        chunks = gather_chunks(data, sampler.batch_indices(step), PHYSICAL)
        trainer.logical_step(state, frozen, chunks)
    params = jax.device_get(state.trainable)
    names = sorted(params)
    frozen_specs = {"/".join(p): str(v.sharding.spec) for p, v in frozen.items()}
    sum_specs = {"/".join(p): str(v.sharding.spec) for p, v in acc[0].items()}
    return {
        "names": ["/".join(p) for p in names],
        "sum": [np.asarray(grad_sum[p], np.float64).ravel().tolist() for p in names],
        "count": float(stats["count"]),
        "params": [np.asarray(params[p], np.float64).ravel().tolist() for p in names],
        "initial": [np.asarray(initial[p], np.float64).ravel().tolist() for p in names],
        "trainable_dtypes": sorted({str(v.dtype) for v in state.trainable.values()}),
        "opt_dtypes": sorted(
            {str(x.dtype) for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.ndim(x) > 0}
        ),
        "sum_dtypes": sorted({str(v.dtype) for v in grad_sum.values()}),
        "frozen_dtypes": sorted({str(v.dtype) for v in frozen.values()}),
        "frozen_specs": frozen_specs,
        "sum_specs": sum_specs,
        "trainable_specs": {"/".join(p): str(v.sharding.spec) for p, v in state.trainable.items()},
        "opt_specs": sorted(
            {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.ndim(x) > 0}
        ),
        "frozen_bytes_per_device": sharding.bytes_per_device(frozen),
        "frozen_bytes": sum(v.size * v.dtype.itemsize for v in frozen.values()),
        "finite": bool(all(np.all(np.isfinite(np.asarray(params[p], np.float32))) for p in names)),
    }


def main():
    assert len(jax.devices()) == 8, jax.devices()
    json.dump({case: run_case(case) for case in sys.argv[1:]}, sys.stdout)


if __name__ == "__main__":
    main()
