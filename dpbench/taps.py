"""Layer taps: what fast per-example clipping needs from a model, without knowing the model.

A layer computes its output ``y`` from a trainable parameter ``p`` and then hands ``y`` to
:func:`output` together with a :class:`Tap` per parameter, which says how ``p``'s gradient is
assembled from what the layer saw:

- ``outer``: the per-example gradient of ``p`` is ``sum_t left_t ⊗ right_t`` (a matrix, then
  reshaped to ``p``'s shape). One of the two factors is a value the
  layer had (its input, or integer ids standing for one-hot rows), the other is ``dL/dy``: Dense
  (``x``, dy), Conv through patches (patches, dy), Embedding lookup (ids, dy), an embedding tied
  as the output head (dy, h), each LoRA factor.
- ``diag``: the per-example gradient is ``sum_t value_t ⊙ dy_t`` (normalisation scales;
  biases with ``value=None``).

Normally :func:`output` returns ``y`` untouched and costs nothing. Only inside
:func:`recording` (the clipping code opens it) does it keep the values, and add a zero
*perturbation* to ``y``, so that the gradient with respect to that perturbation is ``dL/dy``.
Rows of every tapped array are examples (axis 0); examples must not interact (no batch norm).

The recording is a trace-time side channel: a tapped layer must run in the same JAX trace as the
function that opened the recording (no ``jax.jit``/``vmap``/``scan``/``remat`` in between), else
JAX reports an escaped tracer. That is an error, never a silent miscount. A block traced in an inner
trace (a ``jax.checkpoint``-ed decoder block) records through :func:`nested` instead: its
perturbations come in as arguments and its values go out as results, and
:meth:`Recorder.adopt` files them with the outer recording.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax

Path = tuple[str, ...]

OUTER = "outer"
DIAG = "diag"
COTANGENT = "cotangent"  # marks which factor of an outer tap is dL/dy


@dataclasses.dataclass(frozen=True)
class Tap:
    """How one parameter's per-example gradient follows from a layer's value and ``dL/dy``.

    ``value`` is an array whose first axis is the example; ``ids=True`` says it holds integer
    ids of one-hot rows of width ``num_ids`` (embedding lookups). For ``outer`` taps
    ``cotangent_first`` puts ``dL/dy`` on the left (the tied output head: grad = dyᵀ h). The
    ``[d_left, d_right]`` matrix is the parameter reshaped: a convolution's patches come in its
    kernel's (kh, kw, C) row order (``dpbench.models.layers.conv_patches``).
    """

    path: Path
    kind: str
    value: Any = None
    ids: bool = False
    num_ids: int = 0
    cotangent_first: bool = False


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """The static part of a recorded tap (what the clipping code needs besides arrays)."""

    tap_id: str
    point: str  # the perturbation whose gradient is this tap's dL/dy
    path: Path
    kind: str
    ids: bool
    num_ids: int
    cotangent_first: bool
    has_value: bool


class Recorder:
    """Collects taps for the parameters in ``wanted`` during one trace of a model.

    With ``perturbations=None`` it only records shapes (a first, abstract pass); otherwise it
    adds ``perturbations[tap_id]`` to each tapped output and keeps the layers' values.
    """

    def __init__(
        self, wanted: frozenset[Path], perturbations: dict[str, jax.Array] | None = None, prefix: str = ""
    ):
        self.wanted = wanted
        self.perturbations = perturbations
        self.prefix = prefix  # of point names: a nested block's points are told apart by it
        self.specs: list[TapSpec] = []
        self.values: dict[str, jax.Array] = {}
        self.output_shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self._uses: dict[Path, int] = {}
        self._outputs = 0
        self._nested: dict[str, Recorder] = {}

    def add(self, y: jax.Array, taps: Sequence[Tap]) -> jax.Array:
        taps = [t for t in taps if t.path in self.wanted]
        if not taps:
            return y
        point = f"{self.prefix}y{self._outputs}"
        self._outputs += 1
        for tap in taps:
            use = self._uses.get(tap.path, 0)
            self._uses[tap.path] = use + 1
            tap_id = f"{'/'.join(tap.path)}#{use}"
            self.specs.append(
                TapSpec(
                    tap_id=tap_id,
                    point=point,
                    path=tap.path,
                    kind=tap.kind,
                    ids=tap.ids,
                    num_ids=tap.num_ids,
                    cotangent_first=tap.cotangent_first,
                    has_value=tap.value is not None,
                )
            )
            if tap.value is not None:
                self.values[tap_id] = tap.value
        self.output_shapes[point] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        if self.perturbations is None:
            return y
        return y + self.perturbations[point].astype(y.dtype)

    def perturbations_of(self, prefix: str) -> dict[str, jax.Array] | None:
        """The perturbations of the points a block nested under ``prefix`` makes (its explicit input)."""
        if self.perturbations is None:
            return None
        return {k: v for k, v in self.perturbations.items() if k.startswith(prefix)}

    def adopt(self, prefix: str, values: dict[str, jax.Array]) -> None:
        """File what the block nested under ``prefix`` recorded (its last trace), with ``values``: its
        recorded values as returned from the inner trace into this one."""
        child = self._nested.pop(prefix)
        self.specs += child.specs
        self.output_shapes.update(child.output_shapes)
        self._uses = dict(child._uses)
        self.values.update(values)


_STATE = threading.local()


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Route every :func:`output` call made while tracing inside this block to ``recorder``."""
    previous = getattr(_STATE, "recorder", None)
    _STATE.recorder = recorder
    try:
        yield recorder
    finally:
        _STATE.recorder = previous


def active() -> bool:
    """Whether a recording is open (code that traces layers in an inner trace must use :func:`nested`)."""
    return getattr(_STATE, "recorder", None) is not None


def current() -> Recorder | None:
    """The open recording, if any."""
    return getattr(_STATE, "recorder", None)


@contextlib.contextmanager
def nested(prefix: str, perturbations: dict[str, jax.Array] | None) -> Iterator[Recorder]:
    """Record a block traced in an inner JAX trace (``jax.checkpoint``, a scan body) explicitly.

    Opened inside the inner trace: ``perturbations`` (``outer.perturbations_of(prefix)``) are the
    inner function's argument, the yielded recorder's ``values`` must be returned from it, and the
    outer trace then calls ``outer.adopt(prefix, values)``. Point names start with ``prefix`` (unique
    per block); tap ids continue the outer recording's count of uses per parameter. Re-tracing the
    block replaces what an earlier trace recorded.
    """
    outer = _STATE.recorder
    inner = Recorder(outer.wanted, perturbations, prefix=prefix)
    inner._uses = dict(outer._uses)
    outer._nested[prefix] = inner
    with recording(inner):
        yield inner


def wants(path: Path) -> bool:
    """Whether a recording is open and wants ``path`` (layers skip tap-only work otherwise)."""
    recorder = getattr(_STATE, "recorder", None)
    return recorder is not None and path in recorder.wanted


def output(y: jax.Array, taps: Sequence[Tap]) -> jax.Array:
    """``y`` unchanged, or ``y`` + a zero perturbation while a recording wants one of ``taps``."""
    recorder = getattr(_STATE, "recorder", None)
    if recorder is None:
        return y
    return recorder.add(y, taps)
