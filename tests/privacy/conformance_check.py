"""One cell of the conformance matrix per argument, run in a subprocess with 4 fake CPU devices.

``python tests/privacy/conformance_check.py CELL...`` prints JSON ``{cell: result}``. A cell is
``model:clipping:mesh:dtype:remat[:noise[:unit]]`` with ``mesh`` one of ``1``, ``d2``, ``f2``, ``d2f2``,
``noise`` one of ``iid`` (DP-SGD, the default), ``bandmf``, ``blt`` (correlated noise) and ``unit``
``example`` (the default) or ``user`` (``dp.unit=user``: 16 synthetic users of 2 examples, each user's
mean gradient clipped to C, a physical batch of 4 users). Each cell is
built through the product's own path (Hydra config -> ``experiment.build``), so a combination the
config refuses is reported as ``{"refused": <the one-line message>}``. An accepted cell reports:

- ``sum_error``: ‖S - S_ref‖ / ‖S_ref‖, S = the cell's clipped sum of one physical batch (no noise),
  S_ref = the 1-device float32 ``per_example`` sum of the same batch and parameters. With users,
  ‖S - S_ref‖ / (U·C), the size of the U clipped terms: a user whose examples' gradients cancel
  (opposite labels: ‖ḡ‖ = 0.004 ‖gᵢ‖ on the tiny encoder) is scaled up by C/‖ḡ‖, and so is the float32
  rounding of their mean, in the reference as in the cell; the terms' sum can then be much smaller
  than the terms (0.08 C for 4 users there), which would make ‖S_ref‖ measure the cancellation, not
  the implementation;
- ``sensitivity``: max over removed units j (examples, or users: all their rows) of ‖S - S₋ⱼ‖ / C
  (every unit is clipped: C is tiny);
- ``noise``, per randomness mode: the noise the first two logical steps put on the sum (the trainer's
  finalize on a zero sum, threading the noise state), each step's std / (σC) beside the strategy's
  (the norm of that row of C⁻¹: 1 for i.i.d. noise), and the max difference to the same mechanism's
  noise on one device (drawn once, from one key: the same numbers on any mesh).
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpbench import config as config_lib  # noqa: E402
from dpbench import experiment  # noqa: E402
from dpbench.privacy.randomness import PrivacyRandomness  # noqa: E402
from dpbench.train import sharding  # noqa: E402
from dpbench.train.loop import gather_chunks  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

CLIP = 1e-4  # every example's gradient is larger: each one contributes exactly C
SIGMA = 1.5
PHYSICAL = 8
# Sequences of 64 tokens: four times the tiny model's sliding window (16), an eighth of the
# preset's 512, which would only make every cell slower.
GEMMA = [
    "model=tiny_gemma3",
    "dataset=samsum_aclsum",
    "dataset.max_length=64",
    "dataset.max_prompt_length=48",
    "dataset.max_new_tokens=4",
]
MODELS = {
    "cnn": ["model=cnn"],
    "cnn_tanh": ["model=cnn_tempered"],
    "encoder_lora": ["model=tiny_encoder", "dataset=sst2_rt", "model.finetune=lora"],
    "encoder_ffa": ["model=tiny_encoder", "dataset=sst2_rt", "dp=ffa"],
    "encoder_full": ["model=tiny_encoder", "dataset=sst2_rt", "model.finetune=full"],
    "gemma_lora": [*GEMMA, "model.finetune=lora"],
    "gemma_full": [*GEMMA, "model.finetune=full"],
    # A quantized frozen base (QLoRA): its reference is the same quantized model on one float32 device.
    "gemma_nf4": [*GEMMA, "model.frozen_quantization=nf4"],
}
MESHES = {"1": (1, 1), "d2": (2, 1), "f2": (1, 2), "d2f2": (2, 2)}
# Correlated noise needs a run longer than its bands; closed-form strategies keep the build fast.
NOISES = {
    "iid": [],
    "bandmf": ["dp=bandmf", "dp.bands=2", "dp.optimize_strategy=false"],
    "blt": ["dp=blt", "dp.buffers=2", "dp.optimize_strategy=false"],
}
NOISE_STEPS = 2
USER_SLOTS = 2  # dp.max_examples_per_user: 2 rows per device on the 4-device mesh hold one user
UNITS = {
    "example": [],
    "user": [
        "dp.unit=user",
        "dataset.user_key=synthetic",
        "dataset.synthetic_users=16",  # the 32 training examples, 2 per user
        f"dp.max_examples_per_user={USER_SLOTS}",
    ],
}


def overrides(model, clipping, mesh, dtype, remat, noise="iid", unit="example", randomness="seeded"):
    data, fsdp = MESHES[mesh]
    items = [
        *MODELS[model],
        *NOISES[noise],
        *UNITS[unit],
        "logger=none",
        "runner.progress_bar=false",
        "runner.steps=4",
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


def unit_size(exp) -> int:
    return exp.mechanism.units.max_examples_per_user if exp.mechanism.units is not None else 1


def one_batch(exp):
    """The first physical batch: examples 0..7, or users 0..3 with their rows user-major."""
    if exp.mechanism.units is None:
        ((batch, mask),) = gather_chunks(exp.train_arrays, np.arange(PHYSICAL), PHYSICAL)
        return batch, mask
    rows, real = exp.mechanism.units.rows(np.arange(PHYSICAL // unit_size(exp)))
    ((batch, mask),) = gather_chunks(exp.train_arrays, rows, PHYSICAL, mask=real)
    return batch, mask


def clipped_sum(exp, batch, mask):
    device_batch = sharding.put_batch(batch, exp.mesh)
    device_mask = sharding.put_rows(mask, exp.mesh)
    zeros = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, device_batch, device_mask)
    grad_sum, _ = exp.trainer.accumulate(zeros, exp.state.trainable, exp.frozen, device_batch, device_mask)
    grad_sum = jax.device_get(grad_sum)
    return np.concatenate([np.asarray(grad_sum[p], np.float64).ravel() for p in sorted(grad_sum)])


def noise_of_steps(exp, randomness: PrivacyRandomness) -> list[np.ndarray]:
    """σC·(C⁻¹z)ₜ of the first logical steps: the trainer's own finalize on a zero sum with the
    trainer's shardings, threading the noise state, times the expected batch size (finalize divides
    by it)."""
    batch, mask = one_batch(exp)
    device_batch = sharding.put_batch(batch, exp.mesh)
    device_mask = sharding.put_rows(mask, exp.mesh)
    grad_sum, stats = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, device_batch, device_mask)
    trainer = exp.trainer
    noise = exp.mechanism.noise_transform(randomness.noise_key())
    noise_state = noise.init(exp.state.trainable)
    finalize = jax.jit(trainer.finalize)
    trainer.noise = noise
    steps = []
    for _ in range(NOISE_STEPS):
        noisy, noise_state = finalize(grad_sum, stats["count"], noise_state)
        noisy = jax.device_get(noisy)
        flat = np.concatenate([np.asarray(noisy[p], np.float64).ravel() for p in sorted(noisy)])
        steps.append(flat * trainer.expected_batch_size)
    return steps


def expected_std_ratios(exp) -> list[float]:
    """The norm of each of the first rows of C⁻¹ (C: the strategy's lower-triangular Toeplitz matrix)."""
    first_column = exp.mechanism.strategy.toeplitz_coefficients(NOISE_STEPS)
    c = np.array(
        [[first_column[i - j] if i >= j else 0.0 for j in range(NOISE_STEPS)] for i in range(NOISE_STEPS)]
    )
    return [float(np.linalg.norm(row)) for row in np.linalg.inv(c)]


REFERENCES: dict = {}


def run_cell(cell: str, workdir: Path) -> dict:
    model, clipping, mesh, dtype, remat, *rest = cell.split(":")
    noise_kind = rest[0] if rest else "iid"
    unit = rest[1] if len(rest) > 1 else "example"
    out = workdir / cell.replace(":", "_")
    try:
        exp = build(overrides(model, clipping, mesh, dtype, remat, noise_kind, unit), out)
    except config_lib.SETTING_ERRORS as error:
        return {"refused": str(error)}
    key = (model, noise_kind, unit)
    if key not in REFERENCES:  # one per model, noise and unit: 1 device, float32, per-example
        REFERENCES[key] = build(
            overrides(model, "per_example", "1", "float32", "none", noise_kind, unit),
            workdir / "_".join(key),
        )
    reference = REFERENCES[key]
    batch, mask = one_batch(exp)
    ref_batch, ref_mask = one_batch(reference)
    assert all(np.array_equal(batch[k], ref_batch[k]) for k in batch)
    total = clipped_sum(exp, batch, mask)
    expected = clipped_sum(reference, ref_batch, ref_mask)
    sensitivities = []
    k = unit_size(exp)
    for j in range(3):  # remove unit j: one example, or all the rows of user j
        without = mask.copy()
        without[j * k : (j + 1) * k] = False
        sensitivities.append(float(np.linalg.norm(total - clipped_sum(exp, batch, without)) / CLIP))
    units = len(mask) // k
    scale = np.linalg.norm(expected) if k == 1 else units * CLIP
    noise = {}
    for mode in ("secret", "seeded"):
        randomness = (
            PrivacyRandomness.draw() if mode == "secret" else PrivacyRandomness.seeded(0, {"cell": cell})
        )
        drawn = noise_of_steps(exp, randomness)
        on_one_device = noise_of_steps(reference, randomness)
        noise[mode] = {
            "std_ratio": [float(np.std(d) / (SIGMA * CLIP)) for d in drawn],
            "expected_std_ratio": expected_std_ratios(exp),
            "mean_ratio": [float(np.mean(d) / (SIGMA * CLIP)) for d in drawn],
            "size": int(drawn[0].size),
            "max_diff_to_one_device": max(
                float(np.max(np.abs(d - r)) / (SIGMA * CLIP))
                for d, r in zip(drawn, on_one_device, strict=True)
            ),
        }
    return {
        "noise_kind": exp.mechanism.strategy.kind,
        "unit_size": unit_size(exp),
        "clipping": exp.method.clipping,
        "devices": exp.mesh.size,
        "sum_error": float(np.linalg.norm(total - expected) / scale),
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
