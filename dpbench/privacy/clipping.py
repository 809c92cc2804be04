"""Per-example clipping and Gaussian noise (JAX). Nothing here knows which model it clips.

A *losses function* ``losses_fn(trainable, batch, *args) -> (losses [B], aux)`` gives one loss per
example (``aux`` maps names to per-example arrays, e.g. ``correct``); ``trainable`` is a flat
``{path: array}`` dict. Clipping is two steps: the L2 norm ‖gᵢ‖ of each example's gradient, then
the clipped sum Σᵢ cᵢ gᵢ with cᵢ = min(1, C/‖gᵢ‖). Three exact implementations (``dp.clipping``):

- ``per_example``: ``vmap`` of ``grad``; materialises every example's gradient.
- ``ghost``: norms from each layer's inputs and output-gradients (``dpbench.taps``) without
  materialising per-example gradients; the clipped sum is then the gradient of Σᵢ cᵢ Lᵢ (a second
  backward pass over the same forward).
- ``bookkeeping``: the same norms, and the clipped sum contracted from the same stored inputs and
  output-gradients: one backward pass (Bu et al., ICML 2023). Where the norm formed the per-example
  gradients Gᵢ (the materialised route below), the sum is Σᵢ cᵢ Gᵢ over them.

In ``ghost`` and ``bookkeeping`` each tapped parameter takes whichever of the ghost norm (cost
∝ T²(d₁+d₂)) and the materialised per-example gradient (∝ T·d₁·d₂) is cheaper for its shapes (the
mixed rule of Bu et al. 2022: :func:`materialises`; :func:`norm_routes` reports its choice for each
parameter). Both are exact: ‖Σₜ aₜ⊗gₜ‖² = Σₜ,ₛ (aₜ·aₛ)(gₜ·gₛ). A parameter
used by several taps (an embedding tied as the output layer) gets the cross terms too, so its norm
is that of the summed gradient. A trainable parameter that no layer taps falls back to per-example
gradients for that parameter alone, and the log names it.

Formal guarantees (every implementation): padded rows (``mask == False``) and examples whose loss
or gradient is not finite contribute exactly zero to every sum (and are counted in
``nonfinite_sum``); every other example contributes its gradient scaled to norm <= C, so adding or
removing one example moves the sum by at most ``clip_norm``: the sensitivity the Gaussian noise is
calibrated to.

Precision: norms, clip factors and clipped sums are computed in (at least) float32, with float32
contractions (``HIGHEST``: no TF32 or bfloat16 passes), and every sum is returned in (at least)
float32 whatever the parameters' or activations' dtype, so a bfloat16 model's sum still moves by at
most C (up to float32 rounding). The exception is ``ghost`` in a low-precision model: its second
backward pass runs in the model's dtype, whose rounding the first pass's norms do not see (measured
1.005 C in bfloat16), so :func:`require_exact_in` refuses it there.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench import taps
from dpbench.errors import ConfigError

log = logging.getLogger(__name__)

PyTree = Any
LossesFn = Callable[..., tuple[jax.Array, dict]]

CLIPPING_IMPLEMENTATIONS = ("per_example", "ghost", "bookkeeping")

_LOGGED_FALLBACKS: set[tuple] = set()


# Contractions inside the clipping code run in full float32 (on GPUs and TPUs the default precision
# may use TF32 or bfloat16 passes, whose rounding would differ between a norm and its sum).
EXACT = jax.lax.Precision.HIGHEST


def _at_least_f32(x: jax.Array) -> jax.Array:
    """Norms, clip factors and sums in float32 even for bfloat16 activations (float64 stays)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tree_at_least_f32(tree: PyTree) -> PyTree:
    """Every floating leaf of ``tree`` in at least float32 (integer leaves, e.g. token ids, stay)."""
    return jax.tree_util.tree_map(
        lambda x: _at_least_f32(x) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not multiply: a padded row's inf/NaN must not leak into the sum as 0 * inf.
    return jnp.sum(jnp.where(mask, values, 0))


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``mask [B]`` broadcast against ``x [B, ...]``."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------------------------
# per_example: vmap of grad


def per_example_grads(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, *args
) -> tuple[PyTree, jax.Array, dict]:
    """Gradients of each example's loss, stacked on a leading batch axis (vmap of grad)."""

    def one_example(params, example):
        example = jax.tree_util.tree_map(lambda x: x[None], example)
        losses, aux = losses_fn(params, example, *args)
        return losses[0], jax.tree_util.tree_map(lambda a: a[0], aux)

    def with_loss(params, example):
        (loss, aux), grads = jax.value_and_grad(one_example, has_aux=True)(params, example)
        return grads, loss, aux

    return jax.vmap(with_loss, in_axes=(None, 0))(trainable, batch)


def global_norms(stacked_grads: PyTree) -> jax.Array:
    """L2 norm over all parameters of each example's gradient: shape [B]."""
    return jnp.sqrt(_squared_norms(stacked_grads))


def _squared_norms(stacked_grads: PyTree, units: _Units | None = None) -> jax.Array:
    """‖gᵢ‖² per row ``[B]``; with ``units``, of each unit's summed gradient ``[U]``."""
    squares = []
    for g in jax.tree_util.tree_leaves(stacked_grads):
        g = _at_least_f32(g.reshape(g.shape[0], -1))
        squares.append(jnp.sum(jnp.square(g if units is None else units.sum(g)), axis=1))
    return sum(squares)


@dataclasses.dataclass(frozen=True)
class _Units:
    """Privacy units of several rows (user-level DP): rows come unit-major, ``size`` slots per unit
    (``mask`` False on a unit's unused slots). A unit's gradient is the mean of its examples'."""

    mask: jax.Array  # [B] real rows
    size: int  # k: slots per unit

    @property
    def count(self) -> int:
        return self.mask.shape[0] // self.size

    def join(self, x: jax.Array) -> jax.Array:
        """``[B, T, ...]`` -> ``[U, k·T, ...]`` (a unit's rows one after another)."""
        return x.reshape(self.count, -1, *x.shape[2:])

    def sum(self, x: jax.Array) -> jax.Array:
        """``[B, D]`` -> ``[U, D]``: each unit's sum over its real rows (padded ones zeroed, even NaN)."""
        x = jnp.where(_rows(self.mask, x), x, 0)
        return jnp.sum(x.reshape(self.count, self.size, *x.shape[1:]), axis=1)

    def per_unit(self, losses: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each unit's (real?, loss sum: NaN if any real row's is, number of real rows)."""
        slots = self.mask.reshape(self.count, self.size)
        unit_losses = jnp.sum(jnp.where(slots, losses.reshape(self.count, self.size), 0), axis=1)
        return jnp.any(slots, axis=1), unit_losses, jnp.sum(slots, axis=1)

    def to_rows(self, values: jax.Array) -> jax.Array:
        """``[U]`` -> ``[B]``: each row gets its unit's value."""
        return jnp.repeat(values, self.size, total_repeat_length=self.mask.shape[0])


def _weighted_sum(stacked_grads: PyTree, weights: jax.Array, keep: jax.Array) -> PyTree:
    """Σᵢ wᵢ gᵢ over rows with ``keep``, in at least float32; rows without it are dropped even if
    they hold NaN."""

    def one(g):
        g = _at_least_f32(jnp.where(_rows(keep, g), g, 0))
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1, precision=EXACT)

    return jax.tree_util.tree_map(one, stacked_grads)


# ---------------------------------------------------------------------------------------------
# ghost / bookkeeping: norms and sums from layer taps

# How ghost and bookkeeping get one parameter's per-example norm (``_Tapped.norm_route``).
ROUTE_GHOST = "ghost"  # Σₜ,ₛ (aₜ·aₛ)(gₜ·gₛ): cost ∝ T²(d₁+d₂), per-example gradient never formed
ROUTE_MATERIALISED = "materialised"  # Σₜ aₜ⊗gₜ formed per example: cost ∝ T·d₁·d₂
ROUTE_DIAG = "diag"  # a scale or bias: its per-example gradient is a vector, always formed
ROUTE_UNTAPPED = "untapped"  # no layer taps it: vmap of grad for this parameter alone


def materialises(tokens: int, d_left: int, d_right: int) -> bool:
    """The mixed rule (Bu et al. 2022): a parameter whose per-example gradient is Σₜ aₜ⊗gₜ over
    ``tokens`` positions, aₜ of width ``d_left`` and gₜ of ``d_right``, takes its materialised
    per-example gradient (∝ T·d₁·d₂) when that is no dearer than the ghost norm (∝ T²(d₁+d₂)).

    >>> materialises(64, 384, 384), materialises(256, 384, 384)  # MiniLM's attention projections
    (False, True)
    """
    return tokens * (d_left + d_right) >= d_left * d_right


class _Tapped:
    """One forward pass with taps: per-example squared norms, and the parts of a clipped sum."""

    def __init__(self, losses_fn: LossesFn, trainable: dict, batch: dict, args: tuple, two_pass: bool):
        self.trainable = trainable
        wanted = frozenset(trainable)
        probe = taps.Recorder(wanted)

        def probe_fn(params):
            with taps.recording(probe):
                return losses_fn(params, batch, *args)

        jax.eval_shape(probe_fn, trainable)  # shapes of the tapped outputs, nothing computed
        zeros = _like_rows_of(batch, {k: jnp.zeros(s.shape, s.dtype) for k, s in probe.output_shapes.items()})
        recorders = []

        def forward(params, perturbations):
            recorder = taps.Recorder(wanted, perturbations)
            with taps.recording(recorder):
                losses, aux = losses_fn(params, batch, *args)
            recorders.append(recorder)
            return losses, (aux, recorder.values)

        if two_pass:
            self.losses, self._vjp, (self.aux, self.values) = jax.vjp(forward, trainable, zeros, has_aux=True)
            _, self.cotangents = self._vjp(jnp.ones_like(self.losses))
        else:
            self.losses, vjp, (self.aux, self.values) = jax.vjp(
                lambda p: forward(trainable, p), zeros, has_aux=True
            )
            (self.cotangents,) = vjp(jnp.ones_like(self.losses))
        self.specs = recorders[-1].specs
        # Per-example gradients [B, d₁, d₂] that the norms formed (the materialised route, per
        # example): book-keeping sums them, Σᵢ wᵢ Gᵢ, instead of contracting the factors again (a
        # second B·T·d₁·d₂ matmul). Holding one costs at most its factors, which it replaces: the
        # route is taken when T(d₁ + d₂) >= d₁d₂.
        self.formed: dict[tuple, jax.Array] = {}
        self.groups: dict[tuple, list[taps.TapSpec]] = collections.defaultdict(list)
        for spec in self.specs:
            self.groups[spec.path].append(spec)
        for path, group in self.groups.items():
            if len({s.kind for s in group}) > 1:
                raise ValueError(f"parameter {'/'.join(path)} is tapped in incompatible ways: {group}")
        self.untapped = sorted(p for p in trainable if p not in self.groups)
        if self.untapped:
            key = tuple(self.untapped)
            if key not in _LOGGED_FALLBACKS:
                _LOGGED_FALLBACKS.add(key)
                log.warning(
                    "fast clipping: no layer taps %s; per-example gradients for these parameters only",
                    ", ".join("/".join(p) for p in self.untapped),
                )
            untapped = set(self.untapped)
            rest = {p: v for p, v in trainable.items() if p not in untapped}

            def subset_losses(sub, example_batch):
                return losses_fn({**rest, **sub}, example_batch, *args)

            sub = {p: trainable[p] for p in self.untapped}
            self.untapped_grads, _, _ = per_example_grads(subset_losses, sub, batch)
        else:
            self.untapped_grads = {}

    # -- the two factors of an outer tap, as [B, T, d] (or ids [B, T]), at least float32 ----------

    def _outer_factors(self, spec: taps.TapSpec, units: _Units | None = None) -> tuple[jax.Array, jax.Array]:
        """``[B, T, d]`` (ids ``[B, T]``); with ``units``, ``[U, k·T, d]``: a unit's rows as one sequence,
        so the ghost norm's cross terms Σₜ,ₛ (aₜ·aₛ)(gₜ·gₛ) run over every pair of its examples' positions
        and give the norm of the unit's summed gradient. Padded rows are zeroed first."""
        cot = self.cotangents[spec.point]
        batch = cot.shape[0]
        value = self.values[spec.tap_id]
        cot = _at_least_f32(cot.reshape(batch, -1, cot.shape[-1]))
        if spec.ids:
            value = value.reshape(batch, -1)
        else:
            value = _at_least_f32(value.reshape(batch, -1, value.shape[-1]))
        if units is not None:
            cot = units.join(jnp.where(_rows(units.mask, cot), cot, 0))
            value = units.join(value if spec.ids else jnp.where(_rows(units.mask, value), value, 0))
        if spec.ids:
            return value, cot
        return (cot, value) if spec.cotangent_first else (value, cot)

    def _diag_grads(self, spec: taps.TapSpec) -> jax.Array:
        """Per-example gradient ``[B, D]`` of a diag tap (sums over every axis but the first and last)."""
        cot = _at_least_f32(self.cotangents[spec.point])
        product = cot if not spec.has_value else cot * _at_least_f32(self.values[spec.tap_id])
        return jnp.sum(product.reshape(product.shape[0], -1, product.shape[-1]), axis=1)

    # -- norms ------------------------------------------------------------------------------------

    def squared_norms(self, units: _Units | None = None) -> jax.Array:
        """‖gᵢ‖² of every example ``[B]``; with ``units``, of every unit's summed gradient ``[U]``."""
        rows = self.losses.shape[0] if units is None else units.count
        total = jnp.zeros((rows,), jnp.promote_types(self.losses.dtype, jnp.float32))
        for group in self.groups.values():
            if group[0].kind == taps.DIAG:
                grads = sum(self._diag_grads(s) for s in group)
                if units is not None:
                    grads = units.sum(grads)
                total = total + jnp.sum(jnp.square(grads), axis=1)
            else:
                total = total + self._outer_squared_norm(group, units)
        if self.untapped_grads:
            total = total + _squared_norms(self.untapped_grads, units)
        return total

    def norm_route(self, group: list[taps.TapSpec], units: _Units | None = None) -> tuple[str, list]:
        """How the per-example norm of ``group``'s parameter is computed (``ROUTE_*``), and the outer
        factors it reads (none for a diag tap). The norms below and :func:`norm_routes` both ask this.

        Units (user-level DP) always take the materialised route: a unit's norm from the cross
        terms Σ(aₜ·aₛ)(gₜ·gₛ) between its examples rounds with the size of those terms, and when a
        user's examples nearly cancel that error, relative to the user's small norm, grows as 1/r²
        (r = ‖Σᵢ gᵢ‖ / Σᵢ‖gᵢ‖), where the formed gradient's grows as 1/r, as per-example clipping's
        does (the conformance matrix measured 1.00025 C for a user of the encoder from cross terms, and
        at most 1.000004 C on every model from formed gradients)."""
        if group[0].kind == taps.DIAG:
            return ROUTE_DIAG, []
        factors = [self._outer_factors(s, units) for s in group]
        if units is not None:
            return ROUTE_MATERIALISED, factors
        if len(group) == 1 and not group[0].ids:
            left, right = factors[0]
            if materialises(left.shape[1], left.shape[2], right.shape[2]):
                return ROUTE_MATERIALISED, factors
        return ROUTE_GHOST, factors

    def _outer_squared_norm(self, group: list[taps.TapSpec], units: _Units | None = None) -> jax.Array:
        route, factors = self.norm_route(group, units)
        if route == ROUTE_MATERIALISED and len(group) == 1 and group[0].ids:
            return _segment_squared_norms(*factors[0])
        if route == ROUTE_MATERIALISED and len(group) > 1:  # a tied parameter: form [U, *shape]
            formed = sum(self._formed_grads(spec, pair) for spec, pair in zip(group, factors))
            return jnp.sum(jnp.square(formed.reshape(formed.shape[0], -1)), axis=1)
        if route == ROUTE_MATERIALISED:
            left, right = factors[0]
            grads = jnp.einsum("bti,bto->bio", left, right, precision=EXACT)
            if units is None:  # book-keeping's sum reads them (one contraction instead of two)
                self.formed[group[0].path] = grads
            return jnp.sum(jnp.square(grads), axis=(1, 2))
        total = 0.0
        for j, (left_j, right_j) in enumerate(factors):
            for k in range(j, len(factors)):
                left_k, right_k = factors[k]
                gram_left = _gram(left_j, group[j].ids, left_k, group[k].ids)
                gram_right = jnp.einsum("btd,bsd->bts", right_j, right_k, precision=EXACT)
                term = jnp.sum(gram_left * gram_right, axis=(1, 2))
                total = total + (term if j == k else 2.0 * term)
        return total

    def _formed_grads(self, spec: taps.TapSpec, factors: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Each row's gradient of ``spec``'s parameter, ``[rows, *param.shape]``, from its factors."""
        left, right = factors
        param = self.trainable[spec.path]
        rows = right.shape[0]
        if spec.ids:
            table = jnp.zeros((rows, spec.num_ids, right.shape[-1]), right.dtype)
            unit = jnp.broadcast_to(jnp.arange(rows)[:, None], left.shape)
            return table.at[unit, left].add(right).reshape(rows, *param.shape)
        grads = jnp.einsum("bti,bto->bio", left, right, precision=EXACT)
        return grads.reshape(rows, *param.shape)

    # -- clipped sums ------------------------------------------------------------------------------

    def bookkeeping_sum(self, weights: jax.Array, keep: jax.Array) -> dict:
        """Σᵢ wᵢ gᵢ contracted from the taps (at least float32); rows without ``keep`` are zeroed first."""
        grads = {}
        for path, group in self.groups.items():
            param = self.trainable[path]
            if group[0].kind == taps.DIAG:
                per_example = [jnp.where(_rows(keep, d), d, 0) for d in map(self._diag_grads, group)]
                total = sum(jnp.einsum("b,bd->d", weights, d, precision=EXACT) for d in per_example)
            else:
                if path in self.formed:  # Σᵢ wᵢ Gᵢ over the per-example gradients the norms formed
                    kept = jnp.where(_rows(keep, self.formed[path]), self.formed[path], 0)
                    total = jnp.einsum("b,bio->io", weights, kept, precision=EXACT)
                else:
                    total = sum(self._outer_sum(s, weights, keep, param) for s in group)
            # Not cast to the parameter's dtype: a bfloat16 sum would round each example's share.
            grads[path] = total.reshape(param.shape)
        if self.untapped_grads:
            grads.update(_weighted_sum(self.untapped_grads, weights, keep))
        return grads

    def _outer_sum(self, spec: taps.TapSpec, weights, keep, param) -> jax.Array:
        left, right = self._outer_factors(spec)
        right = jnp.where(_rows(keep, right), right, 0) * weights[:, None, None]
        if spec.ids:
            table = jnp.zeros((spec.num_ids, right.shape[-1]), right.dtype)
            return table.at[left.reshape(-1)].add(right.reshape(-1, right.shape[-1]))
        left = jnp.where(_rows(keep, left), left, 0)
        return jnp.einsum("bti,bto->io", left, right, precision=EXACT)

    def second_pass_sum(self, weights: jax.Array, keep: jax.Array) -> dict:
        """Ghost clipping's second backward pass: the gradient of Σᵢ wᵢ Lᵢ over the same forward.

        A non-finite example has wᵢ = 0, but 0 x inf inside its backward pass can still give NaN;
        the book-keeping contraction, which zeroes rows before it sums, then stands in.
        """
        grads, _ = self._vjp(weights.astype(self.losses.dtype))
        grads = _tree_at_least_f32(grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        return jax.lax.cond(finite, lambda: grads, lambda: self.bookkeeping_sum(weights, keep))


def _like_rows_of(batch: dict, tree: dict) -> dict:
    """``tree`` made device-varying over the mesh axes the batch varies over (inside ``shard_map``).

    The gradient with respect to a device-*invariant* input is implicitly summed over the mesh, so
    zero perturbations created here would collect every device's output-gradients, not this one's.
    """
    axes = set()
    for leaf in jax.tree_util.tree_leaves(batch):
        aval = jax.typeof(leaf)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases call it vma
        axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()) or ())
    if not axes:
        return tree
    return jax.lax.pcast(tree, tuple(sorted(axes)), to="varying")


def _segment_squared_norms(ids: jax.Array, vectors: jax.Array) -> jax.Array:
    """‖Σₜ onehot(idₜ)⊗vₜ‖² of each row (``ids [B, T]``, ``vectors [B, T, d]``): the positions of a
    row are sorted by id and each id's vectors summed, so the row's embedding gradient is formed on
    the ids it uses (``[T, d]``), never on the whole table.

    >>> ids = jnp.array([[2, 0, 2]])
    >>> vectors = jnp.array([[[1.0, 0.0], [0.0, 3.0], [-1.0, 1.0]]])
    >>> _segment_squared_norms(ids, vectors).tolist()  # id 2: (0, 1); id 0: (0, 3)
    [10.0]
    """

    def one(row_ids, row_vectors):
        order = jnp.argsort(row_ids)
        sorted_ids = row_ids[order]
        starts = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
        segments = jnp.cumsum(starts) - 1
        sums = jax.ops.segment_sum(row_vectors[order], segments, num_segments=row_ids.shape[0])
        return jnp.sum(jnp.square(sums))

    return jax.vmap(one)(ids, vectors)


def _gram(left_j: jax.Array, ids_j: bool, left_k: jax.Array, ids_k: bool) -> jax.Array:
    """``[B, Tj, Tk]`` inner products of the left factors; ids stand for one-hot rows."""
    if ids_j and ids_k:
        return (left_j[:, :, None] == left_k[:, None, :]).astype(jnp.result_type(float))
    if ids_j:  # onehot(id_t) · v_s = v_s[id_t]
        return jax.vmap(lambda ids, vectors: vectors[:, ids].T)(left_j, left_k)
    if ids_k:
        return jax.vmap(lambda vectors, ids: vectors[:, ids])(left_j, left_k)
    return jnp.einsum("bti,bsi->bts", left_j, left_k, precision=EXACT)


# ---------------------------------------------------------------------------------------------
# the public seam


def _flat(losses_fn: LossesFn, trainable: PyTree) -> tuple[LossesFn, dict, Callable]:
    """Taps name parameters by path: a nested parameter tree is flattened (and unflattened back)."""
    if all(isinstance(k, tuple) for k in trainable):
        return losses_fn, trainable, lambda tree: tree
    return (
        (lambda flat, *rest: losses_fn(unflatten_dict(flat), *rest)),
        flatten_dict(trainable),
        unflatten_dict,
    )


def per_example_norms(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, *args, clipping: str = "per_example"
) -> jax.Array:
    """‖gᵢ‖ of every example's gradient, by the chosen implementation: shape [B]."""
    _check(clipping)
    if clipping == "per_example":
        grads, _, _ = per_example_grads(losses_fn, trainable, batch, *args)
        return global_norms(grads)
    losses_fn, trainable, _ = _flat(losses_fn, trainable)
    return jnp.sqrt(_Tapped(losses_fn, trainable, batch, args, two_pass=False).squared_norms())


def norm_routes(losses_fn: LossesFn, trainable: PyTree, batch: dict, *args) -> dict[str, dict]:
    """How ``ghost`` and ``bookkeeping`` compute each trainable parameter's per-example norm on batches
    shaped like ``batch``: ``{"path/of/param": {"route": ROUTE_*, "taps": n, "ids": embedding lookup?,
    "tokens": T, "dims": [d₁, d₂]}}`` (``tokens`` and ``dims`` for a single outer tap of a dense
    input, the case the mixed rule decides).

    The answer is the norm code's own decision (``_Tapped.norm_route``), traced abstractly with
    ``jax.eval_shape``: nothing is computed.
    """
    losses_fn, flat, _ = _flat(losses_fn, trainable)
    routes: dict[str, dict] = {}

    def trace(params, batch):
        tapped = _Tapped(losses_fn, params, batch, args, two_pass=False)
        for path, group in tapped.groups.items():
            route, factors = tapped.norm_route(group)
            entry = {"route": route, "taps": len(group), "ids": any(s.ids for s in group)}
            if len(group) == 1 and factors and not group[0].ids:
                left, right = factors[0]
                entry.update(tokens=int(left.shape[1]), dims=[int(left.shape[2]), int(right.shape[2])])
            routes["/".join(path)] = entry
        for path in tapped.untapped:
            routes["/".join(path)] = {"route": ROUTE_UNTAPPED, "taps": 0}
        return tapped.losses

    jax.eval_shape(trace, flat, batch)
    return dict(sorted(routes.items()))


def check_tap_coverage(
    losses_fn: LossesFn,
    trainable: PyTree,
    batch: dict,
    *args,
    rtol: float = 1e-3,
    clipping: str = "bookkeeping",
) -> dict[str, float]:
    """Guard for fast clipping: the gradient assembled from the taps must be the true gradient.

    A parameter that a layer taps *and* uses elsewhere (outside ``dpbench.taps``) would get a
    ghost norm that misses part of its gradient: an under-estimate, so a false guarantee. This
    compares Σᵢ gᵢ contracted from the taps with ``jax.grad`` of Σᵢ Lᵢ on a few real examples and
    raises a ``dpbench.config.ConfigError`` (one line naming the parameters, ``dp.clipping`` and
    its allowed values) if they differ. Returns the relative error of each parameter.

    The question is structural, so ask it in float32: ``losses_fn`` should be the model computing in
    float32 (``ModelBundle.in_float32``); the trainable parameters and floating batch entries are
    cast to (at least) float32 here, inside the jitted check. In bfloat16 the two gradients differ
    by rounding (about 1e-2) and every parameter would look uncovered.
    """
    losses_fn, flat, _ = _flat(losses_fn, trainable)
    rows = jnp.ones(jax.tree_util.tree_leaves(batch)[0].shape[0], bool)

    def both(params, batch):
        params, batch = _tree_at_least_f32(params), _tree_at_least_f32(batch)
        tapped = _Tapped(losses_fn, params, batch, args, two_pass=False)
        from_taps = tapped.bookkeeping_sum(rows.astype(jnp.float32), rows)
        true = jax.grad(lambda p: jnp.sum(losses_fn(p, batch, *args)[0]))(params)
        return from_taps, true

    from_taps, true = jax.jit(both)(flat, batch)
    overall = max(float(jnp.max(jnp.abs(v))) for v in true.values())
    errors, wrong = {}, []
    for path, value in true.items():
        # Relative to the leaf, with a floor for leaves whose true gradient is ~0 (key biases).
        scale = max(float(jnp.max(jnp.abs(value))), 1e-3 * overall, 1e-30)
        errors["/".join(path)] = float(jnp.max(jnp.abs(from_taps[path] - value))) / scale
        if not errors["/".join(path)] <= rtol:  # NaN counts as wrong
            wrong.append("/".join(path))
    if wrong:
        named = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise ConfigError(
            f"dp.clipping={clipping} would under-estimate per-example norms: the layer taps miss part of "
            f"the gradient of {named} (used outside dpbench.taps?); use dp.clipping=per_example "
            f"(allowed: auto, {', '.join(CLIPPING_IMPLEMENTATIONS)})"
        )
    return errors


def is_exact_in(implementation: str, dtype: Any) -> bool:
    """Whether ``implementation`` keeps every clipped contribution within C in a model computing in
    ``dtype`` (a name such as ``"bfloat16"``, or a dtype). Ghost's second backward pass runs in the
    model's dtype, so its contributions' norms follow that dtype's rounding, not the norms' float32
    (1.005 C measured in bfloat16): it is exact only in float32 or wider."""
    return implementation != "ghost" or _at_least_f32_dtype(dtype)


def _at_least_f32_dtype(dtype: Any) -> bool:
    dtype = jnp.dtype(dtype or jnp.float32)
    return jnp.promote_types(dtype, jnp.float32) == dtype


def check_fast_clipping(
    implementation: str, dtype: Any, method: str, losses_fn_f32: Callable, trainable, frozen, sample
) -> None:
    """Refuse at start-up, in one line, fast clipping that would not be exact for this model.

    Ghost clipping must compute in float32 (:func:`require_exact_in`), and the layer taps must see
    every use of every trainable parameter (:func:`check_tap_coverage`). Coverage is checked with
    ``losses_fn_f32``, the model computing in float32, where a miss is structure, not rounding.
    """
    require_exact_in(implementation, dtype, method=method)
    errors = check_tap_coverage(losses_fn_f32, trainable, sample, frozen, clipping=implementation)
    log.info(
        "dp.clipping=%s: layer taps cover every trainable parameter (max rel. error %.1e)",
        implementation,
        max(errors.values()),
    )


def require_exact_in(implementation: str, dtype: Any, method: str | None = None) -> None:
    """Refuse, with one line (``dpbench.config.ConfigError``), a clipping implementation that is not
    exact in a model computing in ``dtype`` (``model.dtype``): ghost below float32. ``method``
    (``dp.method``) only shapes the hint: ``dp=ghost`` *is* ghost clipping."""
    if is_exact_in(implementation, dtype):
        return

    name = jnp.dtype(dtype).name
    switch = "dp=vanilla dp.clipping" if method == implementation else "dp.clipping"
    raise ConfigError(
        f"dp.clipping={implementation} is not exact in {name} (its second backward pass rounds in "
        f"model.dtype={name}, so a clipped gradient can exceed dp.clip_norm); use {switch}=bookkeeping "
        f"(or {switch}=per_example), or model.dtype=float32"
    )


CLIP_FNS = ("fixed", "automatic")


def clip_factors(
    norms: jax.Array,
    losses: jax.Array,
    mask: jax.Array,
    clip_norm: float,
    clip_fn: str = "fixed",
    gamma: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """The factor cᵢ of each example's gradient, 0 for padded or non-finite examples; and which examples
    are kept. Either way ‖cᵢ gᵢ‖ <= C, so one example moves the clipped sum by at most C.

    - ``fixed``: cᵢ = min(1, C/‖gᵢ‖) (Abadi et al. 2016);
    - ``automatic``: cᵢ = C/(‖gᵢ‖+γ), AUTO-S of Bu et al. (2023): every gradient is normalised, small
      ones less (γ > 0), so C only scales the update and needs no tuning beside the learning rate.

    >>> norms, ok = jnp.array([0.5, 2.0, 0.0]), jnp.array([True, True, True])
    >>> clip_factors(norms, jnp.zeros(3), ok, 1.0)[0].tolist()
    [1.0, 0.5, 1.0]
    >>> [round(c, 4) for c in clip_factors(norms, jnp.zeros(3), ok, 1.0, "automatic", 0.5)[0].tolist()]
    [1.0, 0.4, 2.0]
    """
    finite = jnp.isfinite(norms) & jnp.isfinite(losses)
    keep = mask & finite
    safe_norms = jnp.where(keep, norms, 1.0)
    if clip_fn == "automatic":
        factors = clip_norm / (safe_norms + gamma)
    else:  # written so that a zero gradient gives factor 1, not NaN
        factors = jnp.minimum(1.0, clip_norm / jnp.maximum(safe_norms, 1e-12))
    return _at_least_f32(jnp.where(keep, factors, 0.0)), keep


def clipped_grad_sum(
    losses_fn: LossesFn,
    trainable: PyTree,
    batch: dict,
    mask: jax.Array,
    clip_norm: float,
    *args,
    clipping: str = "per_example",
    clip_fn: str = "fixed",
    gamma: float = 0.01,
    unit_size: int = 1,
) -> tuple[dict, dict]:
    """Sum over real, finite rows of per-example gradients, each scaled to L2 norm <= ``clip_norm``
    (by :func:`clip_factors` with ``clip_fn``; every implementation scales by the same factors).

    ``unit_size = k > 1`` (user-level DP): the rows are units of ``k`` slots (a user's examples, unit
    after unit, unused slots masked), and what is clipped is each unit's gradient, the mean of its
    examples' gradients; a unit with any non-finite example contributes zero. Removing a unit then
    moves the sum by at most C. Every implementation takes a unit's norm from its formed gradient
    (ghost and book-keeping: per layer, from the taps; never from cross terms, see
    ``_Tapped.norm_route``); the sum is Σᵢ wᵢ gᵢ with each row weighted by its unit's factor / the
    unit's number of examples.
    """
    _check(clipping)
    units = None if unit_size == 1 else _Units(mask, unit_size)
    if clipping == "per_example":
        grads, losses, aux = per_example_grads(losses_fn, trainable, batch, *args)
        squared = _squared_norms(grads, units)
    else:
        losses_fn, trainable, unflatten = _flat(losses_fn, trainable)
        tapped = _Tapped(losses_fn, trainable, batch, args, two_pass=clipping == "ghost")
        losses, aux = tapped.losses, tapped.aux
        squared = tapped.squared_norms(units)
    if units is None:
        norms = jnp.sqrt(squared)
        factors, keep = clip_factors(norms, losses, mask, clip_norm, clip_fn, gamma)
        weights, rows_kept = factors, keep
    else:
        unit_mask, unit_losses, sizes = units.per_unit(losses)
        sizes = jnp.maximum(sizes, 1).astype(squared.dtype)
        norms = jnp.sqrt(squared) / sizes  # the norm of the unit's mean gradient
        factors, keep = clip_factors(norms, unit_losses, unit_mask, clip_norm, clip_fn, gamma)
        rows_kept = units.to_rows(keep) & mask
        # A unit's unused slots get weight 0 too (ghost's second pass sees weights, not rows_kept).
        weights = jnp.where(rows_kept, units.to_rows(factors / sizes), 0.0)
    if clipping == "per_example":
        grad_sum = _weighted_sum(grads, weights, rows_kept)
    elif clipping == "ghost":
        grad_sum = unflatten(tapped.second_pass_sum(weights, rows_kept))
    else:
        grad_sum = unflatten(tapped.bookkeeping_sum(weights, rows_kept))
    stats = _stats(losses, aux, mask, rows_kept)
    stats["clipped_fraction_sum"] = _masked_sum((norms > clip_norm).astype(jnp.float32), keep)
    stats["grad_norm_sum"] = _masked_sum(norms, keep)
    if units is not None:  # the clipping statistics above are per unit; train/ averages them over these
        stats["units"] = jnp.sum(unit_mask.astype(jnp.float32))
    return grad_sum, stats


def masked_grad_sum(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, mask: jax.Array, *args
) -> tuple[PyTree, dict]:
    """Non-private: gradient of the summed loss over real rows (no per-example work)."""

    def summed_loss(params):
        losses, aux = losses_fn(params, batch, *args)
        return _masked_sum(losses, mask), (losses, aux)

    grad_sum, (losses, aux) = jax.grad(summed_loss, has_aux=True)(trainable)
    return _tree_at_least_f32(grad_sum), _stats(losses, aux, mask, mask)


def _stats(losses: jax.Array, aux: dict, mask: jax.Array, keep: jax.Array) -> dict:
    stats = {
        "loss_sum": _masked_sum(losses, keep),
        "count": jnp.sum(mask.astype(jnp.float32)),
        "nonfinite_sum": jnp.sum((mask & ~keep).astype(jnp.float32)),
    }
    for name, values in aux.items():
        stats[f"{name}_sum"] = _masked_sum(values.astype(jnp.float32), keep)
    return stats


def _check(clipping: str) -> None:
    if clipping not in CLIPPING_IMPLEMENTATIONS:
        raise ValueError(
            f"dp.clipping={clipping!r} is not known; choose one of {', '.join(CLIPPING_IMPLEMENTATIONS)}"
        )


__all__ = [
    "CLIPPING_IMPLEMENTATIONS",
    "check_tap_coverage",
    "clip_factors",
    "clipped_grad_sum",
    "global_norms",
    "is_exact_in",
    "masked_grad_sum",
    "materialises",
    "norm_routes",
    "per_example_grads",
    "per_example_norms",
    "require_exact_in",
]
