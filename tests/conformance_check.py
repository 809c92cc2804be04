"""One cell of the conformance matrix per argument, run in a subprocess with 4 fake CPU devices.

``python tests/conformance_check.py CELL...`` prints JSON ``{cell: result}``. A cell is
``model:clipping:mesh:dtype:remat`` with ``mesh`` one of ``1``, ``d2``, ``f2``, ``d2f2``. Each cell is
built through the product's own path (Hydra config -> ``experiment.build``), so a combination the
config refuses is reported as ``{"refused": <the one-line message>}``. An accepted cell reports:

- ``sum_error``: ‖S - S_ref‖ / ‖S_ref‖, S = the cell's clipped sum of one physical batch (no noise),
  S_ref = the 1-device float32 ``per_example`` sum of the same batch and parameters;
- ``sensitivity``: max over removed examples j of ‖S - S₋ⱼ‖ / C (every example is clipped: C is tiny);
- ``noise``, per randomness mode: the noise one logical step puts on the sum (the trainer's finalize
  on a zero sum), its std / (σC), and its max difference to the same mode's noise on one device
  (drawn once, from one key: the same numbers on any mesh).
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpbench import config as config_lib  # noqa: E402
from dpbench import experiment  # noqa: E402
from dpbench.privacy.randomness import PrivacyRandomness  # noqa: E402
from dpbench.train import sharding  # noqa: E402
from dpbench.train.loop import gather_chunks  # noqa: E402
from tests.compose import compose_config  # noqa: E402

CLIP = 1e-4  # every example's gradient is larger: each one contributes exactly C
SIGMA = 1.5
PHYSICAL = 8
MODELS = {
    "cnn": ["model=cnn"],
    "cnn_tanh": ["model=cnn_tempered"],
    "encoder_lora": ["model=tiny_encoder", "dataset=sst2_rt", "model.finetune=lora"],
    "encoder_ffa": ["model=tiny_encoder", "dataset=sst2_rt", "dp=ffa"],
    "encoder_full": ["model=tiny_encoder", "dataset=sst2_rt", "model.finetune=full"],
    "gemma_lora": ["model=tiny_gemma3", "dataset=samsum_aclsum", "model.finetune=lora"],
    "gemma_full": ["model=tiny_gemma3", "dataset=samsum_aclsum", "model.finetune=full"],
}
MESHES = {"1": (1, 1), "d2": (2, 1), "f2": (1, 2), "d2f2": (2, 2)}


def overrides(model, clipping, mesh, dtype, remat, randomness="seeded", seed_dir="unused"):
    data, fsdp = MESHES[mesh]
    items = [
        *MODELS[model],
        "logger=none",
        "runner.progress_bar=false",
        "runner.steps=1",
        "runner.epochs=null",
        "runner.eval_every=0",
        "runner.batch_size=8",
        "dataset.max_train_examples=32",
        "dataset.max_eval_examples=8",
        f"compute.physical_batch_size={PHYSICAL}",
        "compute.eval_batch_size=8",
        f"compute.num_devices={data * fsdp}",
        f"compute.mesh.data={data}",
        f"compute.mesh.fsdp={fsdp}",
        "optimizer=sgd",
        "optimizer.learning_rate=1.0",
        "dp.epsilon=null",
        f"dp.noise_multiplier={SIGMA}",
        f"dp.clip_norm={CLIP}",
        f"dp.clipping={clipping}",
        f"dp.randomness={randomness}",
    ]
    if model.startswith(("encoder", "gemma")):
        items.append(f"model.dtype={dtype}")
    if model.startswith("gemma"):
        items.append(f"model.remat={remat}")
    return items


def build(items, out):
    return experiment.build(compose_config(items, out))


def one_batch(exp):
    indices = np.arange(PHYSICAL)
    ((batch, mask),) = gather_chunks(exp.train_arrays, indices, PHYSICAL)
    return batch, mask


def clipped_sum(exp, batch, mask):
    device_batch = sharding.put_batch(batch, exp.mesh)
    device_mask = sharding.put_rows(mask, exp.mesh)
    zeros = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, device_batch, device_mask)
    grad_sum, _ = exp.trainer.accumulate(zeros, exp.state.trainable, exp.frozen, device_batch, device_mask)
    grad_sum = jax.device_get(grad_sum)
    return np.concatenate([np.asarray(grad_sum[p], np.float64).ravel() for p in sorted(grad_sum)])


def noise_of_one_step(exp, randomness: PrivacyRandomness) -> np.ndarray:
    """σC·z of one logical step: the trainer's own finalize on a zero sum with the trainer's shardings,
    times the expected batch size (finalize divides by it)."""
    batch, mask = one_batch(exp)
    device_batch = sharding.put_batch(batch, exp.mesh)
    device_mask = sharding.put_rows(mask, exp.mesh)
    grad_sum, stats = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, device_batch, device_mask)
    trainer = exp.trainer
    noise = exp.mechanism.noise_transform(randomness.noise_key())
    noise_state = noise.init(exp.state.trainable)
    finalize = jax.jit(lambda g, count, state: trainer.finalize(g, count, state)[0])
    trainer.noise = noise
    noisy = jax.device_get(finalize(grad_sum, stats["count"], noise_state))
    flat = np.concatenate([np.asarray(noisy[p], np.float64).ravel() for p in sorted(noisy)])
    return flat * trainer.expected_batch_size


REFERENCES: dict = {}


def run_cell(cell: str, workdir: Path) -> dict:
    model, clipping, mesh, dtype, remat = cell.split(":")
    out = workdir / cell.replace(":", "_")
    try:
        exp = build(overrides(model, clipping, mesh, dtype, remat), out)
    except config_lib.SETTING_ERRORS as error:
        return {"refused": str(error)}
    if model not in REFERENCES:  # one per model: the 1-device float32 per-example build
        REFERENCES[model] = build(overrides(model, "per_example", "1", "float32", "none"), workdir / model)
    reference = REFERENCES[model]
    batch, mask = one_batch(exp)
    ref_batch, ref_mask = one_batch(reference)
    assert all(np.array_equal(batch[k], ref_batch[k]) for k in batch)
    total = clipped_sum(exp, batch, mask)
    expected = clipped_sum(reference, ref_batch, ref_mask)
    sensitivities = []
    for j in range(3):
        without = mask.copy()
        without[j] = False
        sensitivities.append(float(np.linalg.norm(total - clipped_sum(exp, batch, without)) / CLIP))
    noise = {}
    for mode in ("secret", "seeded"):
        randomness = (
            PrivacyRandomness.draw() if mode == "secret" else PrivacyRandomness.seeded(0, {"cell": cell})
        )
        drawn = noise_of_one_step(exp, randomness)
        on_one_device = noise_of_one_step(reference, randomness)
        noise[mode] = {
            "std_ratio": float(np.std(drawn) / (SIGMA * CLIP)),
            "mean_ratio": float(np.mean(drawn) / (SIGMA * CLIP)),
            "size": int(drawn.size),
            "max_diff_to_one_device": float(np.max(np.abs(drawn - on_one_device)) / (SIGMA * CLIP)),
        }
    return {
        "clipping": exp.method.clipping,
        "devices": exp.mesh.size,
        "sum_error": float(np.linalg.norm(total - expected) / np.linalg.norm(expected)),
        "sum_norm_over_c": float(np.linalg.norm(total) / CLIP),
        "sensitivity": max(sensitivities),
        "count": int(mask.sum()),
        "noise": noise,
    }


def main():
    import tempfile

    assert len(jax.devices()) == 4, jax.devices()
    with tempfile.TemporaryDirectory() as workdir:
        results = {cell: run_cell(cell, Path(workdir)) for cell in sys.argv[1:]}
    print("CONFORMANCE " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
