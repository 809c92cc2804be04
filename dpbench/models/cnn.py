"""Small CNNs for MNIST.

- ``tutorial``: the CNN of the jax_privacy MNIST tutorial (dp_sgd_flax_linen_mnist).
- ``tempered``: the TF Privacy / Papernot et al. (2021) CNN, with a bounded activation (``tanh``,
  the tempered sigmoid that works best under DP) and max pooling; Tramèr & Boneh (2021) use it as
  their end-to-end CNN baseline.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpbench.models import quant
from dpbench.models.base import LABELS, ModelBundle, layer_label
from dpbench.models.layers import Conv, LoRADense
from dpbench.schema import schema


@schema("model", "cnn_schema")
@dataclasses.dataclass
class CNNModelConfig:
    arch: str = "cnn"
    num_classes: int = 10
    image_shape: list[int] = dataclasses.field(default_factory=lambda: [28, 28, 1])
    variant: str = "tutorial"  # tutorial | tempered
    activation: str = "relu"  # relu | tanh (tempered sigmoid, Papernot et al. 2021) | elu
    frozen_quantization: str = "none"  # none only: the CNN has no quantized path (model.arch=gemma3 has)


VARIANTS = ("tutorial", "tempered")
ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "elu": nn.elu}


class CNN(nn.Module):
    """conv32 3x3 - relu - avgpool2 - conv64 3x3 - relu - avgpool2 - dense256 - relu - dense."""

    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = Conv(32, (3, 3), name="Conv_0")(x)
        x = nn.avg_pool(act(x), (2, 2), strides=(2, 2))
        x = Conv(64, (3, 3), name="Conv_1")(x)
        x = nn.avg_pool(act(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = act(LoRADense(256, name="Dense_0")(x))
        return LoRADense(self.num_classes, name="Dense_1")(x)


class TemperedCNN(nn.Module):
    """conv16 8x8/2 - act - maxpool2/1 - conv32 4x4/2 - act - maxpool2/1 - dense32 - act - dense
    (26k parameters; TF Privacy's MNIST tutorial model, tanh in Papernot et al. 2021)."""

    num_classes: int = 10
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = Conv(16, (8, 8), strides=(2, 2), padding="SAME", name="Conv_0")(x)
        x = nn.max_pool(act(x), (2, 2), strides=(1, 1))
        x = Conv(32, (4, 4), strides=(2, 2), padding="VALID", name="Conv_1")(x)
        x = nn.max_pool(act(x), (2, 2), strides=(1, 1))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = act(LoRADense(32, name="Dense_0")(x))
        return LoRADense(self.num_classes, name="Dense_1")(x)


HEAD = "Dense_1"  # the classification layer, last in both variants


def label_of(path: tuple[str, ...]) -> str:
    """``head`` for the last layer; ``bias`` / ``base`` for the others (no LoRA, no norm, no embedding)."""
    return "head" if path[0] == HEAD else layer_label(path)


def build_cnn(cfg: CNNModelConfig, rng: jax.Array, placement=None, abstract: bool = False) -> ModelBundle:
    """The CNN, randomly initialised; ``abstract``: its parameters as ``jax.ShapeDtypeStruct`` only."""
    del placement  # small: stays on the default device (the registry passes none to unplaced builders)
    quant.check(getattr(cfg, "frozen_quantization", "none"), arch="cnn")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"model.variant={cfg.variant!r} is not known; choose one of {', '.join(VARIANTS)}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(
            f"model.activation={cfg.activation!r} is not known; choose one of {', '.join(ACTIVATIONS)}"
        )
    module_type = CNN if cfg.variant == "tutorial" else TemperedCNN
    module = module_type(num_classes=cfg.num_classes, activation=cfg.activation)
    dummy = jnp.zeros((1, *cfg.image_shape), jnp.float32)
    params = (jax.eval_shape(module.init, rng, dummy) if abstract else module.init(rng, dummy))["params"]

    def apply_fn(params, batch):
        return module.apply({"params": params}, batch["image"])

    return ModelBundle(
        apply_fn=apply_fn,
        params=params,
        label_of=label_of,
        trainable_labels=frozenset(LABELS),  # no model.finetune: the CNN trains from scratch, all of it
        weights_source=f"random init ({cfg.variant} CNN, {cfg.activation})",
        module=module,
    )


def saved_architecture(bundle: ModelBundle) -> dict:
    """Nothing beyond ``model.*``: the CNN is its config (``dpbench.models.saved``)."""
    del bundle
    return {}


def from_saved(cfg, architecture: dict, params, directory) -> ModelBundle:
    """The CNN of a saved model folder, with its saved parameters."""
    del architecture
    bundle = build_cnn(cfg, jax.random.key(0), abstract=True)
    return dataclasses.replace(bundle, params=params, weights_source=f"saved:{directory}")


INPUT = "image"  # what it reads (a dataset module's INPUT)
TASKS = ("classification",)  # the dataset.task values it serves
build = build_cnn  # model.arch=cnn (dpbench.models.registry)
