"""Batched greedy decoding with a KV cache for ``dpbench.models.gemma3.model.Gemma3``.

One jit-compiled function per (module, batch shape, ``max_new_tokens``, stop ids): a prefill of the
whole left-padded prompt fills the cache, then a ``lax.while_loop`` appends one token per step and
stops early once every row has produced a stop token. The cache keeps all ``P + max_new_tokens``
slots for every layer; sliding-window layers mask the slots that fell out of their window. Callers
should pad prompts to a fixed length (and the last batch to the full batch size) to avoid recompiling.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpbench.models.gemma3.model import Gemma3, init_cache, tied_logits


def greedy_generate(
    module: Gemma3,
    params: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Greedy continuations ``[B, max_new_tokens]`` of LEFT-padded prompts ``[B, P]``.

    Each row keeps its first stop token; every later slot holds ``pad_id``. ``params`` is the
    ``"params"`` collection (``ModelBundle.params``; LoRA factors are applied unmerged). With a
    ``mesh`` (and a batch its devices divide), the rows are split over all its devices like a training
    batch, each process transferring its own rows; the tokens come back whole on every process.
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be equal [B, P]"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not np.all(prompt_mask[:, -1]):
        raise ValueError("prompts must be LEFT-padded: the last position of every row must be a real token")
    run = _compiled(module, max_new_tokens, tuple(int(s) for s in stop_ids), int(pad_id))
    if mesh is None or len(prompt_ids) % mesh.size:
        return np.asarray(
            run(params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32))
        )
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    count, index = jax.process_count(), jax.process_index()
    per = len(prompt_ids) // count  # the mesh orders devices process by process: contiguous rows each
    ids, mask = (
        jax.make_array_from_process_local_data(
            rows, x[index * per : (index + 1) * per].astype(np.int32), x.shape
        )
        for x in (prompt_ids, prompt_mask)
    )
    return np.asarray(jax.jit(lambda x: x, out_shardings=whole)(run(params, ids, mask)))


@functools.lru_cache(maxsize=16)
def _compiled(module: Gemma3, max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int):
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)  # -1 never matches a token
    trunk = module.clone(head=False)  # prefill: only the last position's logits are needed

    def step(params, tokens, cache):
        logits, cache = module.apply({"params": params}, tokens, jnp.ones_like(tokens), cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @jax.jit
    def run(params, prompt_ids, prompt_mask):
        batch, prompt_len = prompt_ids.shape
        cache = init_cache(module.config, batch, prompt_len + max_new_tokens, module.dtype)
        hidden, cache = trunk.apply({"params": params}, prompt_ids, prompt_mask, cache=cache)
        logits = tied_logits(hidden[:, -1], params["embed_tokens"]["embedding"], module.config, module.dtype)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, stops)

        def cond(state):
            i, _, _, _, done = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, token, cache, out, done = state
            token, cache = step(params, token[:, None], cache)
            token = jnp.where(done, pad_id, token)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            return i + 1, token, cache, out, done | jnp.isin(token, stops)

        _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done))
        return out

    return run
