"""A quantized frozen base (``model.frozen_quantization``): frozen weights stored as int8 or NF4 codes
with a float32 scale, dequantised layer by layer inside the forward pass (QLoRA, Dettmers et al. 2023).

- ``int8``: symmetric, one scale per output channel (``absmax / 127`` over the contraction axis).
- ``nf4``: the 16 NormalFloat-4 levels of QLoRA (bitsandbytes' table), one absmax scale per block of
  ``BLOCK`` = 64 weights along the contraction axis (fewer where that axis is shorter), two codes per
  byte (``uint8``: the even index in the low nibble).

A quantized weight is two named arrays, the codes under the weight's own name (``kernel``,
``embedding``) and ``<name>_scale``, so parameter paths, labels and ``model.sharding_rules`` are the
float model's. The scales are kept in float32 (no double quantisation: 27B nf4 spends 0.0625 byte per
weight on them, ``results/scale.md``).

:func:`dot` multiplies by the dequantised weight under a ``jax.custom_vjp`` whose backward pass keeps
the codes, not the dequantised weight: otherwise autodiff would keep every layer's float copy alive
from the forward to the backward pass, and the step's memory would be that of the float model. The
weight gets no gradient (it is frozen); the input gets its exact gradient through the same
dequantised weight. Layer taps (``dpbench.taps``) record the layer's input and output-gradient as in
the float model, so fast clipping sees the dequantised model's activations and stays exact.

Why our own ~150 lines and not a library: ``qwix`` (0.1.8) and ``aqtp`` install into the venv, but
both quantize by intercepting Flax's parameter creation and ``dot_general`` and keep ``QArray``
pytrees as parameters; dpbench's layer taps, its flat named parameters (safetensors model folder,
regex sharding rules, ``python -m dpbench.plan``'s byte counts) and the FSDP gather all work on plain
named arrays, and neither library saves codes rather than dequantised weights for the backward pass
of a frozen weight in our own layers. The arithmetic here is short and tested against a brute-force
reference (``tests/models/test_quant.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpbench.errors import ConfigError

SCHEMES = ("none", "int8", "nf4")
BLOCK = 64  # nf4 weights per scale, along the contraction axis (QLoRA's block size)
# QLoRA's NormalFloat-4 levels (bitsandbytes ``create_normal_map``), ascending.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
CODE_DTYPES = {"int8": np.int8, "nf4": np.uint8}
BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "nf4": 0.5}  # codes only; scales are extra


def scale_name(name: str) -> str:
    """The parameter name of a quantized weight's scale: ``kernel`` -> ``kernel_scale``."""
    return f"{name}_scale"


def check(scheme: str, arch: str | None = None) -> None:
    """Refuse an unknown scheme, or any scheme on a model without a quantized path (``arch``)."""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"model.frozen_quantization={scheme!r} is not allowed; choose one of {', '.join(SCHEMES)}"
        )
    if arch is not None and scheme != "none":
        raise ConfigError(
            f"model.frozen_quantization={scheme} is not allowed for model.arch={arch}: it has no quantized "
            "path (only model.arch=gemma3 has one); choose model.frozen_quantization=none"
        )


def block_size(length: int) -> int:
    """NF4 weights per scale along an axis of ``length``: 64, or the largest divisor of 64 that divides
    a shorter or odd-sized axis (at least 2: two codes share a byte).

    >>> block_size(640), block_size(32), block_size(96)
    (64, 32, 32)
    """
    size = math.gcd(length, BLOCK)
    if size < 2:
        raise ValueError(f"nf4: an axis of {length} weights cannot be split into blocks of an even size")
    return size


def _axis(axis: int, ndim: int) -> int:
    return axis % ndim


def code_shape(shape: tuple[int, ...], scheme: str, axis: int) -> tuple[int, ...]:
    """The shape of the codes of a weight of ``shape`` quantized along ``axis``."""
    if scheme == "int8":
        return tuple(shape)
    a = _axis(axis, len(shape))
    block_size(shape[a])
    return tuple(n // 2 if i == a else n for i, n in enumerate(shape))


def scale_shape(shape: tuple[int, ...], scheme: str, axis: int) -> tuple[int, ...]:
    """The shape of the scales: ``shape`` without ``axis`` (int8), or with ``axis`` in blocks (nf4)."""
    a = _axis(axis, len(shape))
    if scheme == "int8":
        return tuple(n for i, n in enumerate(shape) if i != a)
    return tuple(n // block_size(n) if i == a else n for i, n in enumerate(shape))


def code_init(scheme: str):
    """A Flax initializer of zero codes (the builder replaces them with the checkpoint's)."""
    return lambda key, shape: jnp.zeros(shape, CODE_DTYPES[scheme])


def quantize(w: np.ndarray, scheme: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scale)`` of a float weight (NumPy, on the host), quantized along ``axis`` (the
    contraction axis: 0 for a ``[in, out]`` kernel, -1 for a ``[V, D]`` embedding)."""
    w = np.asarray(w, np.float32)
    a = _axis(axis, w.ndim)
    if scheme == "int8":
        absmax = np.max(np.abs(w), axis=a)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(w / np.expand_dims(scale, a)), -127, 127).astype(np.int8)
        return codes, scale
    if scheme != "nf4":
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    n = w.shape[a]
    b = block_size(n)
    moved = np.moveaxis(w, a, -1)  # [..., n]
    blocks = moved.reshape(*moved.shape[:-1], n // b, b)
    absmax = np.max(np.abs(blocks), axis=-1)
    scale = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    normalised = blocks / scale[..., None]
    midpoints = (NF4[1:] + NF4[:-1]) / 2  # the nearest level: how many midpoints lie below
    idx = np.searchsorted(midpoints, normalised.reshape(*moved.shape), side="left").astype(np.uint8)
    packed = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return np.moveaxis(packed, -1, a), np.moveaxis(scale, -1, a)


def dequantize(codes: jax.Array, scale: jax.Array, scheme: str, axis: int, dtype: Any = jnp.float32):
    """The float weight of ``(codes, scale)`` in ``dtype`` (computed in float32, then cast)."""
    a = _axis(axis, codes.ndim)
    if scheme == "int8":
        return (codes.astype(jnp.float32) * jnp.expand_dims(scale, a)).astype(dtype)
    low, high = codes & 0x0F, codes >> 4
    idx = jnp.stack([low, high], axis=a + 1)  # even, odd positions
    shape = list(codes.shape)
    shape[a] *= 2
    values = jnp.asarray(NF4)[idx.reshape(shape).astype(jnp.int32)]
    n, blocks = shape[a], scale.shape[a]
    grouped = values.reshape(*shape[:a], blocks, n // blocks, *shape[a + 1 :])
    return (grouped * jnp.expand_dims(scale, a + 1)).reshape(shape).astype(dtype)


def _matmul(x, w, transposed: bool):
    return jnp.einsum("...i,oi->...o", x, w) if transposed else jnp.dot(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dot(x: jax.Array, codes: jax.Array, scale: jax.Array, scheme: str, dtype: Any, transposed: bool = False):
    """``x @ W`` (``transposed=False``: ``W [in, out]`` quantized along axis 0) or ``x @ Wᵀ``
    (``transposed``: ``W [out, in]`` quantized along its last axis, e.g. a tied embedding), with
    ``W`` dequantised to ``dtype``. The backward pass dequantises again from the codes."""
    # The barrier ties the dequantisation to this layer's input: without it the dequantised weight
    # depends on parameters alone, and XLA may compute every layer's copy up front (the 27B nf4 plan
    # held ~100 GiB of float copies that way).
    x, codes, scale = jax.lax.optimization_barrier((x, codes, scale))
    w = dequantize(codes, scale, scheme, -1 if transposed else 0, dtype)
    return _matmul(x.astype(dtype), w, transposed)


def _dot_fwd(x, codes, scale, scheme, dtype, transposed):
    return dot(x, codes, scale, scheme, dtype, transposed), (codes, scale, jnp.zeros((), x.dtype))


def _dot_bwd(scheme, dtype, transposed, residuals, g):
    codes, scale, x_like = residuals
    # As in the forward: not up front. (The barrier's outputs take g's sharding type inside
    # shard_map, so the zero cotangents below are made from the residuals, not from them.)
    g, tied_codes, tied_scale = jax.lax.optimization_barrier((g, codes, scale))
    w = dequantize(tied_codes, tied_scale, scheme, -1 if transposed else 0, dtype)
    dx = jnp.dot(g.astype(dtype), w) if transposed else jnp.einsum("...o,io->...i", g.astype(dtype), w)
    zero_codes = np.zeros(codes.shape, jax.dtypes.float0)  # integer codes: no tangent space
    return dx.astype(x_like.dtype), zero_codes, jnp.zeros_like(scale)


dot.defvjp(_dot_fwd, _dot_bwd)


def quantize_flat(flat: dict, specs: dict) -> dict:
    """``flat`` with every weight at a path in ``specs`` (``{path: (scheme, contraction axis)}``)
    replaced by its codes and a ``<name>_scale`` entry beside it."""
    out = dict(flat)
    for path, (scheme, axis) in specs.items():
        codes, scale = quantize(np.asarray(out.pop(path)), scheme, axis)
        out[path] = codes
        out[path[:-1] + (scale_name(path[-1]),)] = scale
    return out


def dequantize_flat(flat: dict, specs: dict, dtype: Any = jnp.float32) -> dict:
    """The inverse view of :func:`quantize_flat`: each quantized weight as a float array, scales dropped
    (what ``merge_lora`` and a Hugging Face export need)."""
    out = dict(flat)
    for path, (scheme, axis) in specs.items():
        scale = out.pop(path[:-1] + (scale_name(path[-1]),))
        out[path] = np.asarray(dequantize(jnp.asarray(out[path]), jnp.asarray(scale), scheme, axis, dtype))
    return out


def stored_bytes(shape: tuple[int, ...], scheme: str, axis: int) -> int:
    """Bytes of codes plus float32 scales of a weight of ``shape``."""
    codes = int(np.prod(code_shape(shape, scheme, axis)))
    return codes + 4 * int(np.prod(scale_shape(shape, scheme, axis)))
