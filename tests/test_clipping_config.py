"""dp.clipping and model.finetune settings: what they resolve to, and the contradictions refused."""

import pytest

from dpbench.config import ConfigError, validate_static
from dpbench.privacy.methods import FASTEST_EXACT, make_method
from tests.compose import compose_config


@pytest.mark.parametrize(
    ("overrides", "name", "clipping"),
    [
        (["dp=vanilla"], "vanilla", FASTEST_EXACT),
        (["dp=vanilla", "dp.clipping=per_example"], "vanilla", "per_example"),
        (["dp=ghost"], "ghost", "ghost"),
        (["dp=ghost", "dp.clipping=ghost"], "ghost", "ghost"),
        (["dp=ffa", "model=tiny_encoder", "dp.clipping=ghost"], "ffa", "ghost"),
    ],
)
def test_clipping_resolves_and_validates(overrides, name, clipping):
    cfg = compose_config(overrides)
    validate_static(cfg)
    method = make_method(cfg.dp)
    assert (method.name, method.clipping) == (name, clipping)
    assert method.freezes_lora_a == (name == "ffa")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.clipping=fast"], "dp.clipping='fast' is not allowed; choose one of auto, per_example, ghost"),
        (
            ["dp=ghost", "dp.clipping=per_example"],
            "dp.method=ghost is ghost clipping, but dp.clipping=per_ex",
        ),
        (["dp=ffa", "model=tiny_encoder", "model.finetune=full"], "needs model.finetune=lora"),
    ],
)
def test_contradictions_are_refused_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_static(compose_config(overrides))


def test_finetune_is_validated_by_the_model_builder():
    from dpbench.models.encoder import build_encoder

    cfg = compose_config(["model=tiny_encoder", "model.finetune=everything"]).model
    with pytest.raises(
        ValueError, match="model.finetune='everything' is not known; choose one of lora, full, head"
    ):
        build_encoder(cfg, None)


def test_head_finetune_trains_only_the_head():
    import jax

    from dpbench.models.encoder import build_encoder

    bundle = build_encoder(
        compose_config(["model=tiny_encoder", "model.finetune=head"]).model, jax.random.PRNGKey(0)
    )
    from flax.traverse_util import flatten_dict

    paths = list(flatten_dict(bundle.params))
    trainable = [p for p in paths if bundle.is_trainable(p)]
    assert trainable and all(p[0] == "classifier" for p in trainable)
    assert not any(p[-1].startswith("lora") for p in paths)  # LoRA off outside finetune=lora
