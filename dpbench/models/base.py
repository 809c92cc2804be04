"""What the runner gets from any model. Models never import data code.

Every parameter of every model carries a label from ``LABELS`` (``ModelBundle.label_of``); what trains
is a set of labels (as optax's ``multi_transform`` partitions by label, not by hand-split trees):
``model.finetune`` chooses one (``FINETUNE_LABELS``) and a DP method may freeze some of it
(``dpbench.privacy.methods.MethodSpec.frozen_labels``, applied by ``ModelBundle.with_frozen``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

PyTree = Any

# The vocabulary of parameter labels. A model labels each parameter by its role, so what trains can
# be said once for every model.
LABELS = (
    "base",  # the pretrained body's weights (attention, MLP, convolution and dense kernels)
    "lora_a",  # LoRA's down-projection A, random at init (FFA freezes it)
    "lora_b",  # LoRA's up-projection B, zero at init
    "head",  # the task head the body feeds (the encoder's classifier, the CNN's last layer)
    "embedding",  # input embeddings (token, position, token type) that are not also the output layer
    "tied_embedding",  # the input embedding that is also the output layer (Gemma 3's LM head)
    "norm",  # LayerNorm / RMSNorm scales and offsets
    "bias",  # biases of layers outside the head
)
# What each ``model.finetune`` trains. LoRA leaves a tied embedding frozen (the adapters carry the
# fine-tuning; the vocabulary matrix is the largest weight), ``head`` trains it as the output layer.
FINETUNE_LABELS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_a", "lora_b", "head"}),
    "full": frozenset(LABELS),
    "head": frozenset({"head", "tied_embedding"}),
}


def finetune_labels(finetune: str) -> frozenset[str]:
    """The labels ``model.finetune`` trains.

    >>> sorted(finetune_labels("lora"))
    ['head', 'lora_a', 'lora_b']
    """
    if finetune not in FINETUNE_LABELS:
        raise ValueError(
            f"model.finetune={finetune!r} is not known; choose one of {', '.join(FINETUNE_LABELS)}"
        )
    return FINETUNE_LABELS[finetune]


def check_labels(labels, what: str) -> frozenset[str]:
    if isinstance(labels, str):  # a bare "lora_a" would read as its letters
        raise TypeError(f"{what}: a collection of labels, not the string {labels!r}")
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"{what}: unknown parameter labels {unknown}; the labels are {', '.join(LABELS)}")
    return frozenset(labels)


def trainable_by_labels(
    label_of: Callable[[tuple[str, ...]], str], labels
) -> Callable[[tuple[str, ...]], bool]:
    """``path -> bool``: whether the parameter at ``path`` carries one of ``labels``.

    >>> is_trainable = trainable_by_labels(lambda path: path[-1], {"lora_b"})
    >>> is_trainable(("query", "lora_b")), is_trainable(("query", "lora_a"))
    (True, False)
    """
    labels = check_labels(labels, "trainable labels")
    return lambda path: label_of(path) in labels


def layer_label(path: tuple[str, ...]) -> str:
    """The label of a body parameter (neither LoRA factor nor head) from the layer names every dpbench
    model uses: norm layers' names end in ``norm``, flax ``Embed`` tables are ``embedding``."""
    if len(path) > 1 and path[-2].endswith("norm"):
        return "norm"
    if path[-1] == "embedding":
        return "embedding"
    if path[-1] == "bias":
        return "bias"
    return "base"


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
    (the same keys the data code produces) to outputs (logits). ``label_of(path)`` gives the label
    (one of ``LABELS``) of a parameter path (tuple of names); the parameters whose label is in
    ``trainable_labels`` train (``is_trainable``), the others are frozen: they never get gradients or
    optimizer state. A builder sets ``trainable_labels`` from its ``model.finetune``; a DP method
    freezes more through :meth:`with_frozen`. ``float32_variant`` (None when the model already computes
    in float32) builds the same model computing in float32: see :meth:`in_float32`.
    """

    apply_fn: Callable[[PyTree, dict], Any]
    params: PyTree
    label_of: Callable[[tuple[str, ...]], str]
    trainable_labels: frozenset[str]
    weights_source: str  # e.g. "random init", "hf:/path/to/checkpoint", "gguf:/path/file.gguf"
    tokenizer: Any = None  # a dpbench.data.base.Tokenizer for text models
    module: Any = None  # the flax module, for generation and export
    extras: dict = dataclasses.field(default_factory=dict)
    float32_variant: Callable[[], ModelBundle] | None = None
    # Paths of parameters the model gathers itself, through gather_at_use, wherever it uses them
    # (every use): a trainer may pass these sharded. None: every parameter must arrive whole.
    gathered_at_use: Callable[[tuple], bool] | None = None

    def __post_init__(self):
        self.trainable_labels = check_labels(self.trainable_labels, "ModelBundle.trainable_labels")

    @property
    def is_trainable(self) -> Callable[[tuple[str, ...]], bool]:
        """``path -> bool``: whether the parameter at ``path`` trains."""
        return trainable_by_labels(self.label_of, self.trainable_labels)

    def with_frozen(self, labels) -> ModelBundle:
        """A copy of this bundle whose parameters labelled ``labels`` are frozen as well: what trains is
        ``model.finetune``'s labels minus a DP method's ``frozen_labels``."""
        frozen = check_labels(labels, "frozen labels")
        return dataclasses.replace(self, trainable_labels=self.trainable_labels - frozen)

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
