"""The one family of layers every model is built from: Dense (with optional LoRA), Conv, Embed,
LayerNorm, RMSNorm and the tied output head.

Each computes exactly what its Flax counterpart does, under the same parameter names, and hands
its output to ``dpbench.taps.output`` with what the gradient of each of its parameters is made
of. That is how fast exact clipping (ghost, book-keeping) sees inside any model: the layers know
nothing of clipping, and the clipping code knows nothing of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpbench import taps
from dpbench.models import quant

LORA_A = "lora_a"
LORA_B = "lora_b"


class LoRADense(nn.Module):
    """``nn.Dense`` with an optional low-rank update ``(alpha / r) * (x A) B``; same names as ``nn.Dense``.

    ``quantization`` (``int8``/``nf4``, ``dpbench.models.quant``): the kernel is frozen and stored as
    codes (``kernel``) and scales (``kernel_scale``), dequantised here at each use; it has no tap (it
    never trains), the LoRA factors' taps see the same input ``x`` as in the float model."""

    features: int
    use_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    quantization: str = "none"

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        shape = (in_features, self.features)
        x = x.astype(self.dtype)
        if self.quantization == "none":
            kernel = self.param("kernel", self.kernel_init, shape)
            y = jnp.dot(x, kernel.astype(self.dtype))  # [..., d_out]
            tapped = [taps.Tap(self.path + ("kernel",), taps.OUTER, value=x)]
        else:
            q = self.quantization
            codes = self.param("kernel", quant.code_init(q), quant.code_shape(shape, q, 0))
            scale = self.param(
                quant.scale_name("kernel"), nn.initializers.ones, quant.scale_shape(shape, q, 0)
            )
            y = quant.dot(x, codes, scale, q, self.dtype, False)
            tapped = []
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
            tapped.append(taps.Tap(self.path + ("bias",), taps.DIAG))
        y = taps.output(y, tapped)
        if self.lora_rank > 0:
            # A ~ N(0, 1/r) as in the dp-lora / loralib setting; B = 0 so training starts at the base.
            a = self.param(
                LORA_A, nn.initializers.normal(stddev=1.0 / self.lora_rank), (in_features, self.lora_rank)
            )
            b = self.param(LORA_B, nn.initializers.zeros, (self.lora_rank, self.features))
            h = jnp.dot(x, a.astype(self.dtype))  # [..., r]
            h = taps.output(h, [taps.Tap(self.path + (LORA_A,), taps.OUTER, value=x)])
            u = jnp.dot(h, b.astype(self.dtype))  # [..., d_out]
            u = taps.output(u, [taps.Tap(self.path + (LORA_B,), taps.OUTER, value=h)])
            y = y + (self.lora_alpha / self.lora_rank) * u
        return y


class Conv(nn.Module):
    """``nn.Conv`` (NHWC input, HWIO kernel, bias); its kernel's gradient is taken through patches."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: str = "SAME"
    dilation: Sequence[int] = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)  # [kh, kw, C, F]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = x.astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=tuple(self.strides),
            padding=self.padding,
            rhs_dilation=tuple(self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + bias.astype(self.dtype)
        tapped = [taps.Tap(self.path + ("bias",), taps.DIAG)]
        kernel_path = self.path + ("kernel",)
        if taps.wants(kernel_path):  # patches only while a recording asks for this kernel
            patches = conv_patches(x, shape, self.strides, self.padding, self.dilation)
            tapped.append(taps.Tap(kernel_path, taps.OUTER, value=patches))
        return taps.output(y, tapped)


def conv_patches(x: jax.Array, kernel_shape: Sequence[int], strides, padding, dilation) -> jax.Array:
    """Patches of an NHWC input for a ``[kh, kw, C, F]`` kernel: ``[B, H', W', kh * kw * C]``, features
    ordered (kh, kw, C) like the kernel's rows, so ``patchesᵀ dy`` reshapes to the kernel's gradient.

    Cut from the padded input by ``kh·kw`` strided slices, concatenated: pure data movement in runs
    of C floats. XLA:CPU runs ``jax.lax.conv_general_dilated_patches`` as a grouped convolution with
    a one-hot kernel, which cost more than the layer's own convolution (the MNIST CNN's second layer,
    a batch of 128: 34 ms, against 12 ms here and 10 ms for the convolution).
    """
    kh, kw = kernel_shape[:2]
    (sh, sw), (dh, dw) = tuple(strides), tuple(dilation)
    window = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], window, (sh, sw), padding)
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    out_h = (x.shape[1] - window[0]) // sh + 1
    out_w = (x.shape[2] - window[1]) // sw + 1
    columns = [
        x[:, i * dh : i * dh + (out_h - 1) * sh + 1 : sh, j * dw : j * dw + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(columns, axis=-1)


class Embed(nn.Module):
    """``nn.Embed``: rows of ``embedding [V, D]``; ``attend`` is the tied output head ``h Eᵀ``.

    ``quantization``: the table is frozen, stored as codes and ``embedding_scale`` (per row for int8,
    per block of a row for nf4); a lookup dequantises only the rows it takes."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    quantization: str = "none"

    def setup(self):
        shape, q = (self.num_embeddings, self.features), self.quantization
        if q == "none":
            self.embedding = self.param("embedding", self.embedding_init, shape)
            self.embedding_scale = None
        else:
            self.embedding = self.param("embedding", quant.code_init(q), quant.code_shape(shape, q, -1))
            self.embedding_scale = self.param(
                quant.scale_name("embedding"), nn.initializers.ones, quant.scale_shape(shape, q, -1)
            )

    def __call__(self, ids):
        if self.quantization != "none":  # frozen: no tap
            rows, scales = jnp.take(self.embedding, ids, axis=0), jnp.take(self.embedding_scale, ids, axis=0)
            return quant.dequantize(rows, scales, self.quantization, -1, self.dtype)
        y = jnp.take(self.embedding.astype(self.dtype), ids, axis=0)
        path = self.path + ("embedding",)
        return taps.output(y, [taps.Tap(path, taps.OUTER, value=ids, ids=True, num_ids=self.num_embeddings)])

    def attend(self, hidden):
        return attend(
            hidden,
            self.embedding,
            self.path + ("embedding",),
            self.dtype,
            self.embedding_scale,
            self.quantization,
        )


def attend(
    hidden: jax.Array,
    embedding: jax.Array,
    path: tuple[str, ...],
    dtype: Any,
    scale: jax.Array | None = None,
    quantization: str = "none",
) -> jax.Array:
    """Logits ``hidden [..., D] @ embedding [V, D]ᵀ`` of an embedding tied as the output layer
    (``path`` names the embedding, so its two uses add up in one per-example gradient). A quantized
    embedding (codes and ``scale``) is frozen: dequantised inside the product, no tap."""
    if quantization != "none":
        return quant.dot(hidden, embedding, scale, quantization, dtype, True)
    hidden = hidden.astype(dtype)
    y = jnp.einsum("...d,vd->...v", hidden, embedding.astype(dtype))
    return taps.output(y, [taps.Tap(path, taps.OUTER, value=hidden, cotangent_first=True)])


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last axis (statistics in float32), with scale and bias."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        stats = jnp.promote_types(x.dtype, jnp.float32)  # at least float32 (bf16 compute), float64 stays
        x32 = x.astype(stats)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        # Flax's fast variance, E[x²] - E[x]², clipped at 0.
        var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
        normalized = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = normalized * scale.astype(stats) + bias.astype(stats)
        y = taps.output(
            y,
            [
                taps.Tap(self.path + ("scale",), taps.DIAG, value=normalized),
                taps.Tap(self.path + ("bias",), taps.DIAG),
            ],
        )
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` in float32, then back to the input dtype."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
        stats = jnp.promote_types(x.dtype, jnp.float32)
        x32 = x.astype(stats)
        normalized = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = normalized * (1.0 + scale.astype(stats))
        y = taps.output(y, [taps.Tap(self.path + ("scale",), taps.DIAG, value=normalized)])
        return y.astype(x.dtype)  # (x * w).to(dtype), as HF
