"""Adaptive quantile clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping"): the clip norm C follows a target quantile of the per-example
gradient norms, learned from a noisy count.

Each logical step, with C_t the clip norm of that step and bᵢ = 1 if example i was not clipped
(‖gᵢ‖ <= C_t, finite), the mechanism releases two Gaussians:

- the clipped sum S_t + N(0, (z_Δ C_t)²), sensitivity C_t;
- the centred count Σᵢ(bᵢ − ½) + N(0, σ_b²), sensitivity ½ (``count_noise_multiplier`` = σ_b).

Then b̃_t = (Σᵢ(bᵢ − ½) + noise) / B + ½ (B the expected batch size) estimates the unclipped
fraction, and C_{t+1} = C_t · exp(−η (b̃_t − γ)) (γ the target quantile, η the learning rate).

Privacy (the paper's Theorem 1): the two together are one Gaussian mechanism of multiplier z when
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½); so the run is accounted exactly as DP-SGD at z (same sampler, same
steps), and the gradient noise is raised to z_Δ. It needs σ_b > z/2. C's trajectory is a function of
the noisy counts only, so it is covered by the claim and published.

>>> round(gradient_noise_multiplier(1.0, 5.0), 6)  # z = 1, σ_b = 5: z_Δ = (1 − 0.01)^(−½)
1.005038
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dpbench.errors import ConfigError


@dataclasses.dataclass
class AdaptiveClipConfig:
    """``dp.adaptive_clip``: null target_quantile keeps C fixed at dp.clip_norm."""

    # γ: the fraction of examples left unclipped that C moves toward (Andrew et al.: 0.5); null = off
    target_quantile: float | None = None
    learning_rate: float = 0.2  # η of the geometric update C ← C·exp(−η(b̃ − γ)) (Andrew et al.: 0.2)
    # σ_b, the std of the noise on the count of unclipped examples; null = expected batch size / 20
    # (Andrew et al.'s choice). Must exceed σ/2; the gradient noise rises to (σ⁻² − (2σ_b)⁻²)^(−½).
    count_noise_multiplier: float | None = None


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−½): the gradient's multiplier that, with the count's, composes to z."""
    return (noise_multiplier**-2 - (2 * count_noise_multiplier) ** -2) ** -0.5


def check_settings(cfg: AdaptiveClipConfig, clip_fn: str, noise: str) -> None:
    if cfg.target_quantile is None:
        return
    if not 0 < cfg.target_quantile < 1:
        raise ConfigError(
            f"dp.adaptive_clip.target_quantile={cfg.target_quantile} is not allowed; choose a number in "
            "(0, 1) (e.g. 0.5), or null for a fixed dp.clip_norm"
        )
    if not cfg.learning_rate > 0:
        raise ConfigError(
            f"dp.adaptive_clip.learning_rate={cfg.learning_rate} is not allowed; choose a number > 0"
        )
    if cfg.count_noise_multiplier is not None and not cfg.count_noise_multiplier > 0:
        raise ConfigError(
            f"dp.adaptive_clip.count_noise_multiplier={cfg.count_noise_multiplier} is not allowed; choose a "
            "number > 0, or null (expected batch size / 20)"
        )
    if clip_fn != "fixed":
        raise ConfigError(
            f"dp.adaptive_clip needs dp.clip_fn=fixed (got {clip_fn}: every gradient is scaled to about C, "
            "so there is no quantile to follow)"
        )
    if noise != "iid":
        raise ConfigError(
            f"dp.adaptive_clip composes its count with i.i.d. gradient noise (Andrew et al., Theorem 1); "
            f"dp.method with {noise} noise cannot be accounted with it: choose dp=vanilla, or "
            "dp.adaptive_clip.target_quantile=null"
        )


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """The adaptive clipping of a run: its settings, resolved, and its state update (JAX)."""

    target_quantile: float
    learning_rate: float
    count_noise_multiplier: float
    initial_clip_norm: float
    expected_batch_size: float

    @classmethod
    def from_config(cls, cfg: Any, clip_norm: float, expected_batch_size: float, noise_multiplier: float):
        sigma_b = cfg.count_noise_multiplier
        sigma_b = float(expected_batch_size / 20 if sigma_b is None else sigma_b)
        half = noise_multiplier / 2
        if not sigma_b > half:
            raise ConfigError(
                f"dp.adaptive_clip.count_noise_multiplier={sigma_b:.4g} must exceed σ/2 = {half:.4g} "
                f"(Andrew et al., Theorem 1); choose more than {half:.4g}"
            )
        return cls(
            float(cfg.target_quantile), float(cfg.learning_rate), sigma_b, clip_norm, expected_batch_size
        )

    def describe(self, noise_multiplier: float) -> dict:
        return {
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_noise_multiplier": self.count_noise_multiplier,
            "initial_clip_norm": self.initial_clip_norm,
            "gradient_noise_multiplier": gradient_noise_multiplier(
                noise_multiplier, self.count_noise_multiplier
            ),
            "accounting": "Andrew et al. 2021, Theorem 1: gradient and count noise compose to σ",
        }

    def init(self, key) -> dict:
        """The clip state: C for the next step, and the count noise's key and step (checkpointed)."""
        return {
            "clip_norm": jnp.asarray(self.initial_clip_norm, jnp.float32),
            "key": jnp.asarray(key),
            "step": jnp.zeros((), jnp.int32),
        }

    def update(self, state: dict, unclipped: jax.Array, count: jax.Array) -> dict:
        """C_{t+1} from the noisy centred count of ``unclipped`` examples among ``count`` drawn."""
        key = jax.random.fold_in(state["key"], state["step"])
        noise = self.count_noise_multiplier * jax.random.normal(key, (), jnp.float32)
        unclipped_fraction = (unclipped - count / 2 + noise) / self.expected_batch_size + 0.5
        clip_norm = state["clip_norm"] * jnp.exp(
            -self.learning_rate * (unclipped_fraction - self.target_quantile)
        )
        return {"clip_norm": clip_norm, "key": state["key"], "step": state["step"] + 1}
