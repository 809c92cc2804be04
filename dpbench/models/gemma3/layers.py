"""The Gemma 3 decoder block: grouped-query attention with QK-norm and RoPE, the GeGLU MLP, and the
block that joins them (see ``dpbench.models.gemma3.model`` for the whole computation)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpbench import taps
from dpbench.models.gemma3.config import ACTIVATIONS, GLOBAL, SLIDING, Gemma3Config
from dpbench.models.layers import RMSNorm
from dpbench.models.lora import LoraSpec, dense

_MASKED = -1e30  # finite, so a fully masked (padding) query row gives no NaN
INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


def rope(x: jax.Array, positions: jax.Array, base: float, scale: float) -> jax.Array:
    """Rotary embedding of ``x [B, T, heads, head_dim]`` (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (np.arange(0, 2 * half, 2, dtype=np.float32) / (2 * half))) / scale
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, half]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_masks(
    query_slots: jax.Array, key_valid: jax.Array, sliding_window: int
) -> dict[str, jax.Array]:
    """``[B, T, S]`` boolean masks per layer type: key slot ``s`` is visible from query slot ``q`` if it
    is a real token, ``s <= q``, and (sliding layers) ``q - s < sliding_window``.

    >>> m = attention_masks(jnp.arange(4), jnp.array([[True, True, True, False]]), 2)
    >>> m["full_attention"][0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    >>> m["sliding_attention"][0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    """
    key_slots = jnp.arange(key_valid.shape[1])
    distance = query_slots[:, None] - key_slots[None, :]  # [T, S]
    full = (distance >= 0)[None] & key_valid[:, None, :]
    return {GLOBAL: full, SLIDING: full & (distance < sliding_window)[None]}


class Attention(nn.Module):
    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any
    quantization: str = "none"  # of the frozen kernels (dpbench.models.quant)

    @nn.compact
    def __call__(self, x, positions, mask, cache: dict | None, cache_end):
        c, path = self.config, f"layer_{self.layer_index}/attn"
        batch, length, _ = x.shape
        groups = c.num_heads // c.num_kv_heads

        def proj(name, features):
            return dense(
                self.lora,
                f"{path}/{name}",
                features,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=INIT,
                quantization=self.quantization,
            )

        q = proj("q_proj", c.num_heads * c.head_dim)(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = proj("k_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = proj("v_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
        k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        if c.layer_types[self.layer_index] == GLOBAL:
            base, scale = c.rope_global_base, c.rope_global_scale
        else:
            base, scale = c.rope_local_base, 1.0
        q, k = rope(q, positions, base, scale), rope(k, positions, base, scale)

        new_cache = None
        if cache is not None:  # write this chunk at the cache's end, attend to the whole cache
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_end, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_end, 0, 0))
            new_cache = {"k": k, "v": v}

        q = q.reshape(batch, length, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(self.dtype)) * jnp.asarray(
            c.query_pre_attn_scalar**-0.5, self.dtype
        )
        scores = scores.astype(jnp.float32)
        if c.attn_logit_softcapping is not None:
            scores = jnp.tanh(scores / c.attn_logit_softcapping) * c.attn_logit_softcapping
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        out = out.reshape(batch, length, c.num_heads * c.head_dim)
        return proj("o_proj", c.hidden_size)(out), new_cache


class MLP(nn.Module):
    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any
    quantization: str = "none"  # of the frozen kernels (dpbench.models.quant)

    @nn.compact
    def __call__(self, x):
        c, path = self.config, f"layer_{self.layer_index}/mlp"

        def proj(name, features):
            return dense(
                self.lora,
                f"{path}/{name}",
                features,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=INIT,
                quantization=self.quantization,
            )

        gate = jax.nn.gelu(
            proj("gate_proj", c.intermediate_size)(x), approximate=ACTIVATIONS[c.hidden_activation]
        )
        return proj("down_proj", c.hidden_size)(gate * proj("up_proj", c.intermediate_size)(x))


class DecoderLayer(nn.Module):
    """One block. With ``explicit_taps`` (set under remat while layer taps record) the block's tap
    perturbations are an argument and its recorded values a result, ``((x, cache), values)``, so
    nothing recorded leaks out of ``jax.checkpoint`` (see ``dpbench.taps.nested``)."""

    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any
    explicit_taps: bool = False
    quantization: str = "none"  # of the frozen kernels (dpbench.models.quant)

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_end, perturbations=None):
        c, i = self.config, self.layer_index
        recording = taps.nested(f"layer_{i}:", perturbations) if self.explicit_taps else nullcontext()
        with recording as recorder:
            h = RMSNorm(c.rms_norm_eps, name="input_layernorm")(x)
            h, new_cache = Attention(c, i, self.lora, self.dtype, self.quantization, name="attn")(
                h, positions, mask, cache, cache_end
            )
            x = x + RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h)
            h = MLP(c, i, self.lora, self.dtype, self.quantization, name="mlp")(
                RMSNorm(c.rms_norm_eps, name="pre_feedforward_layernorm")(x)
            )
            out = x + RMSNorm(c.rms_norm_eps, name="post_feedforward_layernorm")(h), new_cache
        return out if recorder is None else (out, recorder.values)
