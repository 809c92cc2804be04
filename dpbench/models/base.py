"""What the runner gets from any model. Models never import data code."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

PyTree = Any

# The trainer's "gather at use" function while it traces a training step with parameters left
# sharded (see gather_at_use); None elsewhere (evaluation, generation, init: parameters are whole).
_GATHER_AT_USE: contextvars.ContextVar = contextvars.ContextVar("dpbench_gather_at_use", default=None)


@contextlib.contextmanager
def gathering_at_use(gather: Callable[[str, PyTree], PyTree]) -> Iterator[None]:
    """While tracing inside this context, :func:`gather_at_use` calls ``gather(block, params)``."""
    token = _GATHER_AT_USE.set(gather)
    try:
        yield
    finally:
        _GATHER_AT_USE.reset(token)


def gather_at_use(block: str, params: PyTree) -> PyTree:
    """A model block's parameters (paths relative to ``block``) as the block should use them.

    A model calls this at the start of a block, *inside* its rematerialised function, for the
    parameters it declares in ``ModelBundle.gathered_at_use``: a trainer that leaves those sharded
    (FSDP inside ``shard_map``) gathers them here, so a remat block gathers its weights again in the
    backward pass instead of keeping every gathered weight alive. Outside a trainer: as is.

    >>> gather_at_use("layer_0", {"w": 1})
    {'w': 1}
    """
    gather = _GATHER_AT_USE.get()
    return params if gather is None else gather(block, params)


@dataclasses.dataclass
class ModelBundle:
    """A model ready for the runner.

    ``apply_fn(params, batch)`` is a pure function of the full parameter tree and a batch dict
    (the same keys the data code produces) to outputs (logits). ``is_trainable(path)`` says for a
    parameter path (tuple of names) whether it trains; frozen parameters never get gradients or
    optimizer state. ``float32_variant`` (None when the model already computes in float32) builds the
    same model computing in float32: see :meth:`in_float32`.
    """

    apply_fn: Callable[[PyTree, dict], Any]
    params: PyTree
    is_trainable: Callable[[tuple[str, ...]], bool]
    weights_source: str  # e.g. "random init", "hf:/path/to/checkpoint", "gguf:/path/file.gguf"
    tokenizer: Any = None  # a dpbench.data.base.Tokenizer for text models
    module: Any = None  # the flax module, for generation and export
    extras: dict = dataclasses.field(default_factory=dict)
    float32_variant: Callable[[], ModelBundle] | None = None
    # Paths of parameters the model gathers itself, through gather_at_use, wherever it uses them
    # (every use): a trainer may pass these sharded. None: every parameter must arrive whole.
    gathered_at_use: Callable[[tuple], bool] | None = None

    def in_float32(self) -> ModelBundle:
        """This model computing in float32: the same parameter tree and names (the module casts the
        parameters it uses to its compute dtype), the same functions in ``extras``; ``self`` when it
        already computes in float32. For checks that must see structure, not bfloat16 rounding (the
        fast-clipping tap coverage check)."""
        if self.float32_variant is None:
            return self
        variant = self.float32_variant()  # its functions; the parameters are this bundle's (current) ones
        return dataclasses.replace(
            self,
            apply_fn=variant.apply_fn,
            module=variant.module,
            extras=variant.extras,
            float32_variant=None,
            gathered_at_use=variant.gathered_at_use,
        )
