"""Noise on the sum of clipped contributions, as an optax-style transform whose state is checkpointed.

``transform.init(params) -> state`` and ``transform.update(grad_sum, state) -> (noised, state)``,
once per logical step, on the sum over the whole logical batch (all devices and hosts), before the
division by the expected batch size. The state holds the noise key (derived from the run's privacy
secret, never from ``runner.seed``), the step and, for correlated noise, the stream's buffers. It is
saved with every checkpoint, so a resumed run continues the same noise stream bit for bit; the
checkpoint folder is therefore owner-only, like the secret (it holds past noise).

Strategies (``dp.method`` picks one; ``Mechanism`` builds it once and every reader reads it):

- ``iid``: independent N(0, σ²C²) on every coordinate (DP-SGD). The key of step ``s`` is
  ``fold_in(key, s)``.
- ``bandmf``: banded matrix factorization (Choquette-Choo et al. 2023). The noise of step ``s`` is
  row ``s`` of ``C⁻¹ Z`` for a column-normalised, ``bands``-banded lower-triangular Toeplitz ``C``,
  with ``Z`` i.i.d. N(0, σ²C²). With cyclic Poisson sampling over ``bands`` groups each
  participation has sensitivity C, so the accounting is DP-SGD's at the group's sampling rate.
- ``blt``: buffered linear Toeplitz (Dvijotham et al. 2024; McKenna 2024): ``C`` is a BLT, ``C⁻¹``
  streams with a few buffers. Accounted without amplification, as one Gaussian whose sensitivity is
  ``C``'s worst (k, b)-min-sep column sum under balls-in-bins participation.

The strategies, their optimisers and the streaming noise are jax_privacy's
(``jax_privacy.matrix_factorization``, ``jax_privacy.noise_addition``); dpbench adds the
description, sharding and checkpointing (tests/privacy/test_correlated_noise.py checks the stream
against jax_privacy's own privatizer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NOISE_KINDS = ("iid", "bandmf", "blt")
PyTree = Any


class NoiseTransform(NamedTuple):
    """The shape of ``optax.GradientTransformation``: ``init(params)``, ``update(grad_sum, state)``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


# Unsharded float32 leaves are drawn as one stream, this many elements per loop iteration: the same
# normals as ``jax.random.normal`` per leaf, but XLA:CPU compiles its threefry (a rolled loop whose
# state is four uint32 arrays of the draw's size) once per draw. Drawn leaf by leaf, MiniLM's 100
# leaves kept ~220 MB of compiled code with the update, and each draw held ~4x its leaf in
# temporaries; streamed, 30 MB and one chunk. 16K elements was the fastest chunk on a CPU.
NOISE_CHUNK_ELEMENTS = 1 << 14


def chunk_elements_for(mesh: jax.sharding.Mesh) -> int | None:
    """:data:`NOISE_CHUNK_ELEMENTS` on CPU devices where every trainable leaf is whole on each device
    (no ``fsdp`` axis longer than 1), else None: an fsdp-sharded leaf's draw is already split across
    devices (and a loop over sharded leaves would gather them), and accelerators lower threefry as
    one kernel per draw, which thousands of small loop iterations would only slow down."""
    on_cpu = np.asarray(mesh.devices).flat[0].platform == "cpu"
    return NOISE_CHUNK_ELEMENTS if on_cpu and dict(mesh.shape).get("fsdp", 1) == 1 else None


def _normal_f32(key1: jax.Array, key2: jax.Array, counter: jax.Array) -> jax.Array:
    """``jax.random.normal``'s float32 values at flat positions ``counter`` (uint32) of keys
    ``(key1, key2)`` (scalars, or one per position).

    JAX's partitionable threefry (``jax_threefry_partitionable``, the default) hashes each element's
    flat index as the counter pair (high, low word) and xors the two outputs; ``normal`` maps those
    32 bits to a uniform in (-1, 1) through the mantissa and takes √2·erfinv. The same operations
    give the same bits (tests/privacy/test_noise_chunks.py checks it).
    """
    from jax.extend.random import threefry2x32_p

    key1, key2 = (jnp.broadcast_to(k, counter.shape) for k in (key1, key2))
    bits1, bits2 = threefry2x32_p.bind(key1, key2, jnp.zeros_like(counter), counter)
    bits = bits1 ^ bits2
    one = np.array(1.0, np.float32)
    float_bits = jax.lax.shift_right_logical(bits, jnp.uint32(32 - 23)) | jnp.uint32(one.view(np.uint32))
    floats = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - one
    low = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
    uniform = jax.lax.max(low, floats * (one - low) + low)
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def _streamable(x: jax.Array, key: jax.Array) -> bool:
    return x.dtype == jnp.float32 and key.dtype == jnp.uint32 and key.shape == (2,)


def _stream_fits(sizes: list[int], chunk: int) -> bool:
    """Whether the stream's buffer (each draw padded to whole chunks) stays below 2³¹ elements: the
    loop's offsets are int32, and an overflow would reuse counters, i.e. repeat noise."""
    return chunk * sum(-(-size // chunk) for size in sizes) < 2**31


def _normals_as_one_stream(sizes: list[int], keys: list, chunk: int) -> tuple[jax.Array, np.ndarray]:
    """``jax.random.normal(keys[i], (sizes[i],), float32)`` for every i (raw uint32 keys), drawn
    into one buffer ``chunk`` elements per iteration of one loop: one compiled hash for every leaf,
    and one chunk's hash state live. Returns the buffer and where each draw starts in it.

    Each draw starts a chunk (the rest of its last chunk is drawn and dropped), so a chunk has one
    key, and counters that continue its draw's.
    """
    chunks = [-(-size // chunk) for size in sizes]
    starts = chunk * np.cumsum([0, *chunks])[:-1]
    draw_of_chunk = jnp.asarray(np.repeat(np.arange(len(sizes), dtype=np.int32), chunks))
    draw_starts = jnp.asarray(starts, jnp.uint32)
    key_table = jnp.stack(keys)

    def draw_chunk(index, normals):
        offset = index * chunk
        draw = draw_of_chunk[index]
        key = key_table[draw]
        counter = (offset.astype(jnp.uint32) - draw_starts[draw]) + jax.lax.iota(jnp.uint32, chunk)
        return jax.lax.dynamic_update_slice(normals, _normal_f32(key[0], key[1], counter), (offset,))

    normals = jnp.empty(chunk * sum(chunks), jnp.float32)
    return jax.lax.fori_loop(0, sum(chunks), draw_chunk, normals), starts


def add_iid_gaussian(
    tree: PyTree, key: jax.Array, stddev: float | jax.Array, chunk_elements: int | None = None
) -> PyTree:
    """``tree + N(0, stddev^2)`` independently on every coordinate (one key per leaf).

    ``chunk_elements``: draw the float32 leaves as one stream, that many elements at a time (the
    same normals, less memory and less compiled code; the sum may round its last bit differently,
    as XLA may fold ``stddev`` into √2 in a fused draw). Only for leaves that are not sharded.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = list(jax.random.split(key, len(leaves)))
    streamed = []
    if chunk_elements is not None and jax.config.jax_threefry_partitionable:
        streamed = [i for i, (x, k) in enumerate(zip(leaves, keys)) if _streamable(x, k)]
        if not _stream_fits([leaves[i].size for i in streamed], chunk_elements):
            streamed = []
    noisy = [
        None if i in streamed else x + stddev * jax.random.normal(k, x.shape, x.dtype)
        for i, (x, k) in enumerate(zip(leaves, keys))
    ]
    if streamed:
        normals, starts = _normals_as_one_stream(
            [leaves[i].size for i in streamed], [keys[i] for i in streamed], chunk_elements
        )
        for i, start in zip(streamed, starts):
            x = leaves[i]
            noisy[i] = x + stddev * normals[start : start + x.size].reshape(x.shape)
    return jax.tree_util.tree_unflatten(treedef, noisy)


def iid_gaussian(stddev: float, key: jax.Array, chunk_elements: int | None = None) -> NoiseTransform:
    """Independent Gaussian noise; state ``{"key", "step"}``; step ``s`` uses ``fold_in(key, s)``.

    >>> transform = iid_gaussian(2.0, jax.random.PRNGKey(0))
    >>> state = transform.init({"w": jnp.zeros(3)})
    >>> noised, state = transform.update({"w": jnp.zeros(3)}, state)
    >>> int(state["step"]), noised["w"].shape
    (1, (3,))
    """

    def init(params):
        del params
        return {"key": jnp.asarray(key), "step": jnp.zeros((), jnp.int32)}

    def update(grad_sum, state):
        step_key = jax.random.fold_in(state["key"], state["step"])
        noised = add_iid_gaussian(grad_sum, step_key, stddev, chunk_elements)
        return noised, {"key": state["key"], "step": state["step"] + 1}

    return NoiseTransform(init, update)


def correlated_gaussian(noising_matrix, stddev: float, key: jax.Array) -> NoiseTransform:
    """Noise ``C⁻¹ Z`` streamed by jax_privacy's ``matrix_factorization_privatizer``.

    ``noising_matrix`` is a ``jax_privacy.matrix_factorization.StreamingMatrix`` (``C⁻¹``). The
    state is jax_privacy's (key, stream buffers) as a dict, with a step counter beside it.
    """
    from jax_privacy import noise_addition

    privatizer = noise_addition.matrix_factorization_privatizer(
        noising_matrix, stddev=stddev, prng_key=jnp.asarray(key)
    )

    def init(params):
        key_state, stream = privatizer.init(params)
        return {"key": key_state, "step": jnp.zeros((), jnp.int32), "stream": stream}

    def update(grad_sum, state):
        noised, (key_state, stream) = privatizer.update(grad_sum, (state["key"], state["stream"]))
        return noised, {"key": key_state, "step": state["step"] + 1, "stream": stream}

    return NoiseTransform(init, update)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The noise correlation of a run: which kind, its parameters, and how to stream ``C⁻¹``.

    ``coefficients``: BandMF's Toeplitz coefficients of ``C`` (column-normalised), or BLT's
    (buf_decay, output_scale); empty for i.i.d. noise.
    """

    kind: str = "iid"
    steps: int = 0
    bands: int | None = None
    buffers: int | None = None
    optimized: bool = False
    coefficients: tuple = ()

    def describe(self) -> dict:
        """JSON-able; stored in checkpoints and records (a resume must continue the same strategy)."""
        description = {"kind": self.kind}
        if self.kind == "bandmf":
            description.update(bands=self.bands, optimized=self.optimized)
            description["toeplitz_coefficients"] = [round(float(c), 6) for c in self.coefficients]
        elif self.kind == "blt":
            buf_decay, output_scale = self.coefficients
            description.update(buffers=len(buf_decay), optimized=self.optimized)
            description["buf_decay"] = [round(float(c), 6) for c in buf_decay]
            description["output_scale"] = [round(float(c), 6) for c in output_scale]
        return description

    @classmethod
    def from_description(cls, description: dict | None, steps: int) -> Strategy:
        """The strategy a record or checkpoint describes (``describe()``; None: i.i.d.), for
        recomputing its accounting (coefficients as described, rounded to 6 digits).

        >>> Strategy.from_description({"kind": "bandmf", "bands": 2, "optimized": False,
        ...                            "toeplitz_coefficients": [0.9, 0.4]}, 10).bands
        2
        """
        description = description or {"kind": "iid"}
        kind = description["kind"]
        if kind == "bandmf":
            coefficients = tuple(description["toeplitz_coefficients"])
            return cls(
                kind,
                steps,
                bands=len(coefficients),
                optimized=description["optimized"],
                coefficients=coefficients,
            )
        if kind == "blt":
            coefficients = (tuple(description["buf_decay"]), tuple(description["output_scale"]))
            buffers = description["buffers"]
            return cls(
                kind, steps, buffers=buffers, optimized=description["optimized"], coefficients=coefficients
            )
        return cls("iid", steps)

    def transform(self, stddev: float, key: jax.Array, chunk_elements: int | None = None) -> NoiseTransform:
        """The noise transform; ``chunk_elements`` (i.i.d. noise on unsharded leaves): draw in chunks."""
        if self.kind == "iid":
            return iid_gaussian(stddev, key, chunk_elements)
        return correlated_gaussian(self.noising_matrix(), stddev, key)

    def noising_matrix(self):
        """``C⁻¹`` as a jax_privacy ``StreamingMatrix`` (float32 buffers)."""
        from jax_privacy.matrix_factorization import banded, buffered_toeplitz, streaming_matrix

        if self.kind == "iid":
            return streaming_matrix.identity()
        if self.kind == "bandmf":
            coefs = jnp.asarray(np.asarray(self.coefficients, np.float32))
            return banded.ColumnNormalizedBanded.from_banded_toeplitz(
                self.steps, coefs
            ).inverse_as_streaming_matrix()
        buf_decay, output_scale = self.coefficients
        builder = buffered_toeplitz.StreamingMatrixBuilder(
            buf_decay=np.asarray(buf_decay, np.float32), output_scale=np.asarray(output_scale, np.float32)
        )
        return builder.build_inverse()

    def noise_variances(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Per step t, the variance (per coordinate, unit-variance Z) of the noise added at step t and of
        the noise in the running sum of the first t noised gradients: the row norms² of C⁻¹ and of
        A C⁻¹, A the prefix-sum matrix. The running sum is the papers' error measure: i.i.d. noise gives
        t, correlated noise less at the same σ, by adding more at each step and cancelling it later.
        Host-side NumPy in O(steps² · bands) (reports compute it for every record); the tests check it
        against jax_privacy's ``row_norms_squared`` of the streamed ``C⁻¹`` the training adds.

        >>> [v.tolist() for v in Strategy("iid", 3).noise_variances(3)]
        [[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]

        Two bands (1, -1), columns normalised to (1, -1)/√2 but the last to 1: the rows of C⁻¹ are
        √2·e0, √2·(e0 + e1) and e0 + e1 + e2.

        >>> strategy = Strategy("bandmf", 3, 2, coefficients=(1.0, -1.0))
        >>> [np.round(v, 3).tolist() for v in strategy.noise_variances(3)]
        [[2.0, 4.0, 3.0], [2.0, 10.0, 21.485]]
        """
        if self.kind == "iid":
            return np.ones(steps), np.arange(1.0, steps + 1)
        if self.kind == "blt":  # C is lower-triangular Toeplitz, and so is C⁻¹: its first column is d
            c = self.toeplitz_coefficients(steps)
            d = np.zeros(steps)
            d[0] = 1 / c[0]
            for k in range(1, steps):
                d[k] = -np.dot(c[1 : k + 1], d[k - 1 :: -1]) / c[0]
            return np.cumsum(d**2), np.cumsum(np.cumsum(d) ** 2)
        # BandMF: C banded and column-normalised; rows of C⁻¹ by forward substitution, keeping the last
        # bands - 1 of them and the running sum of all.
        coefs = np.asarray(self.coefficients, np.float64)
        bands = len(coefs)
        column_norms = np.sqrt(np.cumsum(coefs**2))  # column j holds coefs[: min(bands, steps - j)]
        norm = column_norms[np.minimum(bands, steps - np.arange(steps)) - 1]
        rows: list[np.ndarray] = []
        running = np.zeros(steps)
        per_step, running_sum = np.zeros(steps), np.zeros(steps)
        for t in range(steps):
            row = np.zeros(steps)
            row[t] = 1.0
            for k in range(1, min(bands, t + 1)):
                row -= (coefs[k] / norm[t - k]) * rows[-k]
            row /= coefs[0] / norm[t]
            rows = [*rows[-(bands - 2) :], row] if bands > 1 else []
            running += row
            per_step[t], running_sum[t] = row @ row, running @ running
        return per_step, running_sum

    def toeplitz_coefficients(self, n: int) -> np.ndarray:
        """The first column of ``C`` (n entries; float64), as the sensitivity sees it."""
        if self.kind == "iid":
            return np.eye(1, n)[0]
        if self.kind == "bandmf":
            coefs = np.asarray(self.coefficients, np.float64)
            return np.pad(coefs / np.linalg.norm(coefs), (0, max(0, n - len(coefs))))[:n]
        from jax_privacy.matrix_factorization import buffered_toeplitz

        buf_decay, output_scale = self.coefficients
        with jax.enable_x64():
            blt = buffered_toeplitz.BufferedToeplitz.build(buf_decay, output_scale, dtype=jnp.float64)
            return np.asarray(blt.toeplitz_coefs(n), np.float64)

    def minsep_sensitivity_squared(self, steps: int, min_sep: int) -> float:
        """Squared sensitivity (per unit clip norm) of the first ``steps`` rows when an example takes
        part at most ``ceil(steps / min_sep)`` times, at least ``min_sep`` steps apart (jax_privacy's
        ``toeplitz.minsep_sensitivity_squared``)."""
        from jax_privacy.matrix_factorization import toeplitz

        if steps <= 0:
            return 0.0
        if self.kind == "bandmf":
            # Column-normalised (every column norm 1, the last ones too) and banded within min_sep:
            # participations are orthogonal, so the sensitivity² is their count (jax_privacy's banded).
            from jax_privacy.matrix_factorization import banded

            coefs = jnp.asarray(np.asarray(self.coefficients, np.float32))
            return float(
                banded.minsep_sensitivity_squared(
                    banded.ColumnNormalizedBanded.from_banded_toeplitz(steps, coefs), min_sep=min_sep
                )
            )
        coefs = self.toeplitz_coefficients(steps)
        with jax.enable_x64():
            value = toeplitz.minsep_sensitivity_squared(
                jnp.asarray(coefs), min_sep=min_sep, max_participations=math.ceil(steps / min_sep), n=steps
            )
        return float(value)


def noise_std(strategy: Strategy, steps: int, std_on_sum: float, batch: float) -> dict[str, float]:
    """The noise std per coordinate of the averaged gradient (``std_on_sum`` = σC over the expected
    ``batch``, times the strategy's row norms): RMS over ``steps`` of the noise added at each step (what
    Adam's second moment sees) and of the noise in the running sum of updates so far (what plain SGD's
    parameters carry; BandMF and BLT lower it at a given σ by adding more per step), and the running
    sum's at the last step.

    >>> {k: round(v, 3) for k, v in noise_std(Strategy("iid", 4), 4, std_on_sum=2.0, batch=10).items()}
    {'per_step': 0.2, 'running_sum': 0.316, 'running_sum_last': 0.4}
    """
    per_step, running_sum = strategy.noise_variances(steps)
    scale = std_on_sum / batch
    return {
        "per_step": scale * float(np.sqrt(per_step.mean())),
        "running_sum": scale * float(np.sqrt(running_sum.mean())),
        "running_sum_last": scale * float(np.sqrt(running_sum[-1])),
    }


def bandmf(steps: int, bands: int, optimize: bool) -> Strategy:
    """A ``bands``-banded Toeplitz strategy for ``steps`` steps: optimised for the mean error of the
    prefix sums (jax_privacy ``toeplitz.optimize_banded_toeplitz``), or Fichtenberger et al.'s
    closed-form coefficients truncated to ``bands`` (``optimize=False``)."""
    from jax_privacy.matrix_factorization import toeplitz

    if optimize and bands > 1:
        coefs = toeplitz.optimize_banded_toeplitz(n=steps, bands=bands)
    else:
        coefs = toeplitz.optimal_max_error_strategy_coefs(bands)
    coefs = np.asarray(coefs, np.float64)
    return Strategy(
        "bandmf", steps, bands=bands, optimized=optimize, coefficients=tuple(coefs / np.linalg.norm(coefs))
    )


@functools.lru_cache(maxsize=8)
def _optimized_blt(steps: int, min_sep: int, participations: int, buffers: int) -> tuple:
    from jax_privacy.matrix_factorization import buffered_toeplitz

    with jax.enable_x64():
        blt = buffered_toeplitz.optimize(
            n=steps, min_sep=min_sep, max_participations=participations, error="max", max_buffers=buffers
        )
        return tuple(np.asarray(blt.buf_decay).tolist()), tuple(np.asarray(blt.output_scale).tolist())


def blt(steps: int, min_sep: int, buffers: int, optimize: bool) -> Strategy:
    """A BLT strategy with at most ``buffers`` buffers for ``steps`` steps under (k, min_sep)
    participation: optimised for the max error (jax_privacy ``buffered_toeplitz.optimize``, tens of
    seconds on a CPU), or the rational approximation of the optimal √-Toeplitz (``optimize=False``)."""
    from jax_privacy.matrix_factorization import buffered_toeplitz

    participations = math.ceil(steps / min_sep)
    if optimize:
        coefficients = _optimized_blt(steps, min_sep, participations, buffers)
    else:
        with jax.enable_x64():
            approx = buffered_toeplitz.BufferedToeplitz.from_rational_approx_to_sqrt_x(buffers)
            coefficients = (
                tuple(np.asarray(approx.buf_decay).tolist()),
                tuple(np.asarray(approx.output_scale).tolist()),
            )
    return Strategy("blt", steps, buffers=buffers, optimized=optimize, coefficients=coefficients)
