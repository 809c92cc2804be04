"""The DP methods a run can choose (``dp.method``): how a logical batch becomes one gradient.

- ``none``: the non-private baseline, mean gradient over the examples actually drawn.
- ``vanilla``: DP-SGD. Per-example gradients of all trainable parameters, clipped to norm C,
  summed over the whole logical batch, N(0, σ²C²) added once to that sum, divided by the
  *expected* logical batch size (dividing by the realised size would leak it).
- ``ffa``: the same clipping and noise; LoRA's A matrices stay frozen at their random init
  (the model builder is told ``freeze_lora_a``), so only B (and any head) train.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpbench.privacy import clipping


@dataclasses.dataclass(frozen=True)
class GradientMethod:
    name: str
    clip_norm: float | None  # None for the non-private method
    freezes_lora_a: bool = False

    @property
    def private(self) -> bool:
        return self.clip_norm is not None

    def grad_sum(self, losses_fn, trainable, batch, mask, *args):
        """Sum over one physical batch; sums from several physical batches simply add up."""
        if self.private:
            return clipping.clipped_grad_sum(losses_fn, trainable, batch, mask, self.clip_norm, *args)
        return clipping.masked_grad_sum(losses_fn, trainable, batch, mask, *args)

    def finalize(self, grad_sum, count, key, noise_multiplier, expected_batch_size):
        """The gradient the optimizer sees, from the summed gradient of a whole logical batch."""
        if not self.private:
            return jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1.0), grad_sum)
        noisy = clipping.add_gaussian_noise(grad_sum, key, noise_multiplier * self.clip_norm)
        return jax.tree_util.tree_map(lambda g: g / expected_batch_size, noisy)


def make_method(dp_cfg) -> GradientMethod:
    if dp_cfg.method == "none":
        return GradientMethod("none", clip_norm=None)
    if dp_cfg.method == "vanilla":
        return GradientMethod("vanilla", clip_norm=float(dp_cfg.clip_norm))
    if dp_cfg.method == "ffa":
        return GradientMethod("ffa", clip_norm=float(dp_cfg.clip_norm), freezes_lora_a=True)
    raise ValueError(f"dp.method={dp_cfg.method!r} is not known; choose one of none, vanilla, ffa")
