"""The Gemma 3 text decoder in Flax linen, with LoRA, matching transformers' ``Gemma3ForCausalLM``.

Each block: ``x + post_attn_norm(attn(input_norm(x)))`` then ``x + post_ffw_norm(mlp(pre_ffw_norm(x)))``.
RMSNorm multiplies by ``(1 + scale)`` in float32; attention is grouped-query with RMS-normalised
queries and keys (QK-norm), RoPE (base 10k on sliding-window layers, 1M, optionally linearly scaled,
on global ones; every 6th layer is global), scores scaled by ``query_pre_attn_scalar ** -0.5`` and
masked by causality, padding and (local layers) the sliding window ``q - k < sliding_window``; the
MLP is GeGLU with tanh-approximated GELU. Embeddings are multiplied by ``sqrt(hidden)`` rounded to
the compute dtype, and the output layer is the (tied) embedding.

Every projection is made by ``dpbench.models.lora.dense`` under the path ``layer_{i}/attn/q_proj``
(``k_proj``, ``v_proj``, ``o_proj``) or ``layer_{i}/mlp/gate_proj`` (``up_proj``, ``down_proj``), so
LoRA targets are regular expressions on these names (default ``("q_proj", "v_proj")``, what keras-hub's
``enable_lora`` targets in the jax_privacy Gemma notebook).

Positions default to ``cumsum(attention_mask) - 1``, which is right for right padding (training) and
left padding (generation). With a KV cache (``init_cache``) the call writes its keys and values at the
cache's end and returns ``(logits, new_cache)``; see ``dpbench.models.gemma3.generate``.
The block itself (attention, MLP) is in ``dpbench.models.gemma3.layers``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpbench import taps
from dpbench.models import remat as remat_lib
from dpbench.models.base import gather_at_use
from dpbench.models.gemma3.config import Gemma3Config
from dpbench.models.gemma3.layers import INIT, DecoderLayer, attention_masks
from dpbench.models.layers import Embed, RMSNorm, attend
from dpbench.models.lora import LoraSpec

EMBEDDING_PATH = ("embed_tokens", "embedding")  # tied: the input embedding is also the output layer

# model.remat: what a decoder block keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = remat_lib.POLICIES


def gathers_at_use(path: tuple) -> bool:
    """The parameters a Gemma 3 block gathers itself (``dpbench.models.base.gather_at_use``): all of
    ``layer_i/...``; the embedding and the final norm arrive whole."""
    return str(path[0]).startswith("layer_")


def _gathering(layer_type, block: str):
    """``layer_type`` whose parameters pass through ``gather_at_use(block, ...)`` on entry."""

    def gather(variables):  # {"params": this block's parameter tree}
        if "params" not in variables:  # init: nothing stored yet
            return variables
        return {**variables, "params": gather_at_use(block, variables["params"])}

    return nn.map_variables(layer_type, "params", trans_in_fn=gather, init=True, mutable=True)


def remat_layer(remat: str, block: str | None = None):
    """``DecoderLayer`` under ``nn.remat`` with the named policy (plain for ``remat=none``).

    With ``block`` (its name, ``layer_i``) the block gathers its own parameters on entry
    (``gather_at_use``), inside the checkpointed function, so under remat an FSDP-sharded weight is
    gathered again for the backward pass, not kept. Under ghost / book-keeping clipping the block
    records its layer taps explicitly (``explicit_taps``): the taps' inputs and output-gradients are
    still stored (they are results of the checkpointed block), everything else in the block,
    gathered weights included, is recomputed."""
    remat_lib.check(remat)
    layer_type = DecoderLayer if block is None else _gathering(DecoderLayer, block)
    if REMAT_POLICIES[remat] is None:
        return layer_type
    return nn.remat(layer_type, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat]))


def tied_logits(
    hidden: jax.Array,
    embedding: jax.Array,
    config: Gemma3Config,
    dtype: Any,
    path: tuple[str, ...] = EMBEDDING_PATH,
    scale: jax.Array | None = None,
    quantization: str = "none",
) -> jax.Array:
    """float32 logits of final hidden states through the tied embedding ``[V, D]`` at ``path`` (then
    softcapped if configured); a quantized embedding comes as codes and ``scale``."""
    logits = attend(hidden, embedding, path, dtype, scale, quantization).astype(jnp.float32)
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


def head_logits(module: Gemma3, params: dict, hidden: jax.Array) -> jax.Array:
    """``tied_logits`` of ``hidden`` through the embedding in ``params``, as ``module`` stores it."""
    embed = params["embed_tokens"]
    return tied_logits(
        hidden,
        embed["embedding"],
        module.config,
        module.dtype,
        scale=embed.get("embedding_scale"),
        quantization=module.embed_quantization,
    )


class Gemma3(nn.Module):
    """``Gemma3ForCausalLM``: ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` (float32).

    ``head=False`` returns the final (normed) hidden states ``[B, T, D]`` instead, from the same
    parameters; ``tied_logits`` then maps any selection of them to logits. On the 270M model the
    262,144-way output layer is about 60% of the forward FLOPs, so a loss on a few target positions
    is much cheaper that way.
    """

    config: Gemma3Config
    lora: LoraSpec | None = None
    dtype: Any = jnp.float32
    head: bool = True
    remat: str = "none"  # a key of REMAT_POLICIES
    # model.frozen_quantization of the frozen decoder kernels and of the tied embedding, when frozen
    quantization: str = "none"
    embed_quantization: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions=None, cache: dict | None = None):
        """Without ``cache``: the logits. With ``cache`` (from ``init_cache``): the chunk's tokens are
        appended to it and ``(logits, new_cache)`` is returned; positions then continue from the number
        of real tokens already cached."""
        c = self.config
        mask = attention_mask.astype(bool)
        if positions is None:
            before = 0 if cache is None else jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)[:, None]
            positions = before + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
        if cache is None:
            cache_end, key_valid, query_slots = 0, mask, jnp.arange(input_ids.shape[1])
        else:
            cache_end = cache["end"]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, cache_end))
            query_slots = cache_end + jnp.arange(input_ids.shape[1])
        masks = attention_masks(query_slots, key_valid, c.sliding_window)

        embed = Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=INIT,
            quantization=self.embed_quantization,
            name="embed_tokens",
        )
        x = embed(input_ids) * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        new_layers = []
        remat = self.remat if cache is None else "none"  # generation: no backward pass
        recorder = taps.current() if REMAT_POLICIES[remat] is not None else None
        for i in range(c.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            layer_type = remat_layer(remat, f"layer_{i}") if cache is None else DecoderLayer
            layer = layer_type(
                c,
                i,
                self.lora,
                self.dtype,
                explicit_taps=recorder is not None,
                quantization=self.quantization,
                name=f"layer_{i}",
            )
            if recorder is None:
                x, new_layer = layer(x, positions, masks[c.layer_types[i]], layer_cache, cache_end)
            else:  # remat while taps record: the block's taps go in and out explicitly
                prefix = f"layer_{i}:"
                (x, new_layer), values = layer(
                    x, positions, masks[c.layer_types[i]], None, 0, recorder.perturbations_of(prefix)
                )
                recorder.adopt(prefix, values)
            new_layers.append(new_layer)
        x = RMSNorm(c.rms_norm_eps, name="final_norm")(x)
        logits = (
            tied_logits(
                x,
                embed.embedding,
                c,
                self.dtype,
                embed.path + ("embedding",),
                embed.embedding_scale,
                self.embed_quantization,
            )
            if self.head
            else x
        )
        if cache is None:
            return logits
        new_cache = {"layers": new_layers, "mask": key_valid, "end": cache_end + input_ids.shape[1]}
        return logits, new_cache


def init_cache(config: Gemma3Config, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> dict:
    """An empty KV cache for ``max_length`` tokens (all layers keep every slot; sliding-window layers
    mask the old ones)."""
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {
        "layers": [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)
        ],
        "mask": jnp.zeros((batch_size, max_length), bool),
        "end": jnp.zeros((), jnp.int32),
    }
