"""Batched decoding with a KV cache for ``dpbench.models.gemma3.model.Gemma3``: greedy, or sampled
with a temperature, top-k and top-p (``Sampling``) from a seed.

One jit-compiled function per (module, batch shape, ``max_new_tokens``, stop ids, sampling): a prefill of the
whole left-padded prompt fills the cache, then a ``lax.while_loop`` appends one token per step and
stops early once every row has produced a stop token. The cache keeps all ``P + max_new_tokens``
slots for every layer; sliding-window layers mask the slots that fell out of their window. Callers
should pad prompts to a fixed length (and the last batch to the full batch size) to avoid recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpbench.models.gemma3.model import Gemma3, head_logits, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Draw each token from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
    tokens (0: all) and then to the smallest set of most likely tokens whose probability reaches
    ``top_p`` (1: all). Row ``r`` of a prompt list draws from the key ``fold_in(key(seed), r)``, folded
    with the token's index, so a row's text does not depend on the batch it was generated in."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (greedy: no Sampling)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: no top-k)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """``[..., V]`` logits divided by the temperature, with the tokens top-k and top-p exclude at -inf.

    >>> s = Sampling(top_p=0.6)
    >>> jnp.isfinite(filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), s)).tolist()
    [True, True, False]
    """
    logits = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def _next_token(logits, sampling: Sampling | None, keys, index):
    """Greedy (``sampling`` None) or one draw per row from ``fold_in(row key, index)``."""
    if sampling is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, index), row))
    return draw(keys, filtered).astype(jnp.int32)


def generate(
    module: Gemma3,
    params: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    sampling: Sampling | None = None,
    row_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Continuations ``[B, max_new_tokens]`` of LEFT-padded prompts, greedy or sampled (``sampling``);
    ``row_ids`` (default ``0..B-1``) number the rows for their random keys (see :class:`Sampling`)."""
    prompt_ids, prompt_mask = _check(prompt_ids, prompt_mask, max_new_tokens)
    rows = np.arange(len(prompt_ids)) if row_ids is None else np.asarray(row_ids)
    seed = 0 if sampling is None else sampling.seed
    unseeded = None if sampling is None else dataclasses.replace(sampling, seed=0)  # one compilation
    run = _compiled(module, max_new_tokens, tuple(int(s) for s in stop_ids), int(pad_id), unseeded)
    ids, mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    return np.asarray(run(params, ids, mask, jnp.asarray(rows, jnp.int32), jnp.uint32(seed)))


def _check(prompt_ids, prompt_mask, max_new_tokens: int):
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be equal [B, P]"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not np.all(prompt_mask[:, -1]):
        raise ValueError("prompts must be LEFT-padded: the last position of every row must be a real token")
    return prompt_ids, prompt_mask


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
    prompt_ids, prompt_mask = _check(prompt_ids, prompt_mask, max_new_tokens)
    if mesh is None or len(prompt_ids) % mesh.size:
        return generate(module, params, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_id)
    run = _compiled(module, max_new_tokens, tuple(int(s) for s in stop_ids), int(pad_id), None)
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
    rows_unused = jnp.zeros((len(prompt_ids),), jnp.int32)  # greedy: no random keys
    tokens = run(params, ids, mask, rows_unused, jnp.uint32(0))
    return np.asarray(jax.jit(lambda x: x, out_shardings=whole)(tokens))


@functools.lru_cache(maxsize=16)
def _compiled(
    module: Gemma3, max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int, sampling: Sampling | None
):
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)  # -1 never matches a token
    trunk = module.clone(head=False)  # prefill: only the last position's logits are needed

    def step(params, tokens, cache, keys, index):
        logits, cache = module.apply({"params": params}, tokens, jnp.ones_like(tokens), cache=cache)
        return _next_token(logits[:, -1], sampling, keys, index), cache

    @jax.jit
    def run(params, prompt_ids, prompt_mask, row_ids, seed):
        batch, prompt_len = prompt_ids.shape
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(row_ids)
        cache = init_cache(module.config, batch, prompt_len + max_new_tokens, module.dtype)
        hidden, cache = trunk.apply({"params": params}, prompt_ids, prompt_mask, cache=cache)
        logits = head_logits(module, params, hidden[:, -1])
        token = _next_token(logits, sampling, keys, 0)
        out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, stops)

        def cond(state):
            i, _, _, _, done = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, token, cache, out, done = state
            token, cache = step(params, token[:, None], cache, keys, i)
            token = jnp.where(done, pad_id, token)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            return i + 1, token, cache, out, done | jnp.isin(token, stops)

        _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done))
        return out

    return run
