"""The small CNN of the jax_privacy MNIST tutorial (dp_sgd_flax_linen_mnist)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpbench.models.base import ModelBundle
from dpbench.models.layers import Conv, LoRADense


@dataclasses.dataclass
class CNNModelConfig:
    arch: str = "cnn"
    num_classes: int = 10
    image_shape: list[int] = dataclasses.field(default_factory=lambda: [28, 28, 1])


class CNN(nn.Module):
    """conv32 3x3 - relu - avgpool2 - conv64 3x3 - relu - avgpool2 - dense256 - relu - dense."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = Conv(32, (3, 3), name="Conv_0")(x)
        x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = Conv(64, (3, 3), name="Conv_1")(x)
        x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(LoRADense(256, name="Dense_0")(x))
        return LoRADense(self.num_classes, name="Dense_1")(x)


def build_cnn(cfg: CNNModelConfig, rng: jax.Array, freeze_lora_a: bool = False) -> ModelBundle:
    del freeze_lora_a  # no LoRA in the CNN: every parameter trains
    module = CNN(num_classes=cfg.num_classes)
    params = module.init(rng, jnp.zeros((1, *cfg.image_shape), jnp.float32))["params"]

    def apply_fn(params, batch):
        return module.apply({"params": params}, batch["image"])

    return ModelBundle(
        apply_fn=apply_fn,
        params=params,
        is_trainable=lambda path: True,
        weights_source="random init",
        module=module,
    )
