"""dp.clipping and model.finetune settings: what they resolve to, and the contradictions refused
(ghost clipping in a bfloat16 model among them)."""

import pytest

from dpbench.config import ConfigError, validate_static
from dpbench.privacy.methods import FASTEST_EXACT, check_clipping_dtype, make_method
from tests.helpers import TINY, compose_config


@pytest.mark.parametrize(
    ("overrides", "name", "clipping"),
    [
        (["dp=vanilla"], "vanilla", FASTEST_EXACT),
        (["dp=vanilla", "dp.clipping=per_example"], "vanilla", "per_example"),
        (["dp=ghost"], "ghost", "ghost"),
        (["dp=ghost", "dp.clipping=ghost"], "ghost", "ghost"),
        (["dp=ffa", "model=tiny_encoder", "dataset=sst2_rt", "dp.clipping=ghost"], "ffa", "ghost"),
    ],
)
def test_clipping_resolves_and_validates(overrides, name, clipping):
    cfg = compose_config(overrides)
    validate_static(cfg)
    method = make_method(cfg.dp)
    assert (method.name, method.clipping) == (name, clipping)
    assert method.frozen_labels == (("lora_a",) if name == "ffa" else ())


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


GHOST_IN_BF16 = "dp.clipping=ghost is not exact in bfloat16"


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["dp=ghost"], "use dp=vanilla dp.clipping=bookkeeping (or dp=vanilla dp.clipping=per_example)"),
        (["dp.clipping=ghost"], "use dp.clipping=bookkeeping (or dp.clipping=per_example)"),
        (["dp=ffa", "dp.clipping=ghost"], "use dp.clipping=bookkeeping (or dp.clipping=per_example)"),
    ],
)
def test_ghost_clipping_in_bfloat16_is_refused_in_one_line(overrides, hint):
    """Ghost's second backward pass rounds in bfloat16 (one example moved the sum by 1.005 C)."""
    cfg = compose_config(["model=tiny_gemma3", "model.dtype=bfloat16", *overrides])
    with pytest.raises(ConfigError, match=GHOST_IN_BF16) as caught:
        validate_static(cfg)  # before any data or weights load
    assert "\n" not in str(caught.value) and hint in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dtype=bfloat16"],  # auto: book-keeping
        ["model.dtype=bfloat16", "dp.clipping=per_example"],
        ["model.dtype=bfloat16", "dp=none", "dp.clipping=ghost"],  # nothing is clipped
        ["dp=ghost"],  # float32
    ],
)
def test_exact_clipping_in_bfloat16_is_allowed(overrides):
    cfg = compose_config(["model=tiny_gemma3", "dataset=samsum_aclsum", *overrides])
    check_clipping_dtype(cfg.dp.method, cfg.dp.clipping, cfg.model.dtype)
    validate_static(cfg)


def test_build_refuses_ghost_in_bfloat16_before_training(tmp_path):
    from dpbench import experiment

    overrides = [*TINY, "model=tiny_gemma3", "dataset=samsum_aclsum", "model.dtype=bfloat16", "dp=ghost"]
    with pytest.raises(ConfigError, match=GHOST_IN_BF16) as caught:
        experiment.build(compose_config(overrides, tmp_path))
    assert "\n" not in str(caught.value)
