"""Parameter labels: every model labels every parameter, and what trains (model.finetune's labels minus
the DP method's frozen ones) is exactly the set the per-model rules gave before labels existed."""

import collections
import functools

import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict

from dpbench import experiment
from dpbench.models.base import FINETUNE_LABELS, LABELS, finetune_labels, trainable_by_labels
from dpbench.models.registry import build_model
from dpbench.privacy.methods import METHODS, make_method
from tests.helpers import TINY, compose_config

MODELS = [
    ("cnn", None),
    ("cnn_tempered", None),
    ("tiny_encoder", "lora"),
    ("tiny_encoder", "full"),
    ("tiny_encoder", "head"),
    ("tiny_gemma3", "lora"),
    ("tiny_gemma3", "full"),
    ("tiny_gemma3", "head"),
]


def _overrides(model: str, finetune: str | None, *extra: str) -> list[str]:
    return [f"model={model}", *([f"model.finetune={finetune}"] if finetune else []), *extra]


@functools.cache
def built(model: str, finetune: str | None, dtype: str | None = None):
    """The bundle as experiment.build gets it from the registry (before the method freezes anything)."""
    cfg = compose_config(_overrides(model, finetune, *([f"model.dtype={dtype}"] if dtype else [])))
    bundle = build_model(cfg.model, jax.random.PRNGKey(0))
    return bundle, list(flatten_dict(bundle.params))


# Label counts per model (tiny_encoder: 2 layers, LoRA rank 4 on query and value; tiny_gemma3: 6 layers,
# LoRA on q_proj and v_proj, 4 block norms + q/k norms per layer and a final norm).
LABEL_COUNTS = {
    "cnn": {"base": 3, "bias": 3, "head": 2},
    "cnn_tempered": {"base": 3, "bias": 3, "head": 2},
    "tiny_encoder": {"embedding": 3, "norm": 10, "base": 12, "bias": 12, "head": 4},
    "tiny_gemma3": {"tied_embedding": 1, "norm": 37, "base": 42},
}
LORA_COUNTS = {"tiny_encoder": 2 * 2, "tiny_gemma3": 6 * 2}  # layers x targets, each with lora_a and lora_b
EXAMPLES = {
    "cnn": {("Conv_0", "kernel"): "base", ("Dense_0", "bias"): "bias", ("Dense_1", "bias"): "head"},
    "cnn_tempered": {("Conv_1", "bias"): "bias", ("Dense_1", "kernel"): "head"},
    "tiny_encoder": {
        ("encoder", "embeddings", "word_embeddings", "embedding"): "embedding",
        ("encoder", "embeddings", "norm", "bias"): "norm",
        ("encoder", "layer_1", "output_norm", "scale"): "norm",
        ("encoder", "layer_0", "attention", "key", "kernel"): "base",
        ("encoder", "layer_0", "attention", "query", "bias"): "bias",
        ("encoder", "layer_0", "attention", "query", "lora_a"): "lora_a",
        ("encoder", "layer_1", "attention", "value", "lora_b"): "lora_b",
        ("classifier", "dense", "bias"): "head",
        ("classifier", "out_proj", "kernel"): "head",
    },
    "tiny_gemma3": {
        ("embed_tokens", "embedding"): "tied_embedding",
        ("final_norm", "scale"): "norm",
        ("layer_2", "attn", "k_norm", "scale"): "norm",
        ("layer_0", "pre_feedforward_layernorm", "scale"): "norm",
        ("layer_3", "mlp", "down_proj", "kernel"): "base",
        ("layer_5", "attn", "q_proj", "lora_a"): "lora_a",
        ("layer_5", "attn", "v_proj", "lora_b"): "lora_b",
    },
}


@pytest.mark.parametrize(("model", "finetune"), MODELS)
def test_every_parameter_gets_a_label_of_the_vocabulary(model, finetune):
    bundle, paths = built(model, finetune)
    labels = collections.Counter(bundle.label_of(p) for p in paths)
    assert set(labels) <= set(LABELS)
    lora = LORA_COUNTS.get(model, 0) if finetune == "lora" else 0  # LoRA exists only under finetune=lora
    assert labels == {**LABEL_COUNTS[model], **({"lora_a": lora, "lora_b": lora} if lora else {})}
    for path, label in EXAMPLES[model].items():
        if label.startswith("lora_") and not lora:
            assert path not in paths
        else:
            assert bundle.label_of(path) == label, path


def _all(path):
    return True


def _lora(path):
    return path[-1] in ("lora_a", "lora_b")


def _lora_b(path):
    return path[-1] == "lora_b"


def _classifier(path):
    return path[0] == "classifier"


# What trained before labels (dpbench.models.lora.trainable_rule and the builders' freeze_lora_a), written
# out per (model, model.finetune, method): the CNN trains everything; the encoder's head is head_pattern
# "classifier"; Gemma's head under finetune=head is the tied embedding (head_pattern "^embed_tokens/"),
# and under finetune=lora Gemma trains the adapters alone. FFA's freeze_lora_a mattered only under LoRA.
# The counts pin the sets down further.
OLD_RULE = {
    ("cnn", None, "vanilla"): (_all, 8),
    ("cnn", None, "ffa"): (_all, 8),
    ("cnn_tempered", None, "ffa"): (_all, 8),
    ("tiny_encoder", "lora", "none"): (lambda p: _lora(p) or _classifier(p), 12),
    ("tiny_encoder", "lora", "vanilla"): (lambda p: _lora(p) or _classifier(p), 12),
    ("tiny_encoder", "lora", "ghost"): (lambda p: _lora(p) or _classifier(p), 12),
    ("tiny_encoder", "lora", "ffa"): (lambda p: _lora_b(p) or _classifier(p), 8),
    ("tiny_encoder", "full", "vanilla"): (_all, 41),
    ("tiny_encoder", "full", "ffa"): (_all, 41),
    ("tiny_encoder", "head", "vanilla"): (_classifier, 4),
    ("tiny_encoder", "head", "ffa"): (_classifier, 4),
    ("tiny_gemma3", "lora", "none"): (_lora, 24),
    ("tiny_gemma3", "lora", "vanilla"): (_lora, 24),
    ("tiny_gemma3", "lora", "ffa"): (_lora_b, 12),
    ("tiny_gemma3", "full", "vanilla"): (_all, 80),
    ("tiny_gemma3", "full", "ffa"): (_all, 80),
    ("tiny_gemma3", "head", "vanilla"): (lambda p: p == ("embed_tokens", "embedding"), 1),
    ("tiny_gemma3", "head", "ffa"): (lambda p: p == ("embed_tokens", "embedding"), 1),
}


@pytest.mark.parametrize(("model", "finetune", "method"), list(OLD_RULE))
def test_trainable_set_is_the_one_before_labels(model, finetune, method):
    bundle, paths = built(model, finetune)
    dp = compose_config(_overrides(model, finetune, f"dp={method}")).dp
    trains = bundle.with_frozen(make_method(dp).frozen_labels).is_trainable  # as experiment.build
    rule, count = OLD_RULE[model, finetune, method]
    assert {p for p in paths if trains(p)} == {p for p in paths if rule(p)}
    assert sum(map(trains, paths)) == count


def test_finetune_modes_and_methods_name_known_labels():
    assert finetune_labels("lora") == {"lora_a", "lora_b", "head"}
    assert finetune_labels("full") == set(LABELS)
    assert finetune_labels("head") == {"head", "tied_embedding"}
    assert set(FINETUNE_LABELS) == {"lora", "full", "head"}
    assert {name: spec.frozen_labels for name, spec in METHODS.items() if spec.frozen_labels} == {
        "ffa": ("lora_a",)
    }
    with pytest.raises(ValueError, match="model.finetune='everything' is not known"):
        finetune_labels("everything")


def test_unknown_labels_are_refused():
    bundle, _ = built("tiny_encoder", "lora")
    with pytest.raises(ValueError, match=r"frozen labels: unknown parameter labels \['lora_c'\]"):
        bundle.with_frozen(("lora_c",))
    with pytest.raises(ValueError, match=r"unknown parameter labels \['adapter'\]"):
        trainable_by_labels(bundle.label_of, {"adapter"})
    with pytest.raises(TypeError, match="a collection of labels, not the string 'lora_a'"):
        bundle.with_frozen("lora_a")


def test_with_frozen_leaves_the_bundle_and_its_float32_variant_consistent():
    bundle, paths = built("tiny_gemma3", "lora", "bfloat16")
    ffa = bundle.with_frozen(("lora_a",))
    assert bundle.trainable_labels == {"lora_a", "lora_b", "head"}  # the original is unchanged
    assert ffa.trainable_labels == {"lora_b", "head"}
    exact = ffa.in_float32()
    assert exact is not ffa and [p for p in paths if exact.is_trainable(p)] == [
        p for p in paths if ffa.is_trainable(p)
    ]


@pytest.mark.parametrize(
    ("finetune", "in_float32"),
    [
        ("lora", _lora),
        ("full", _all),
        ("head", lambda p: p == ("embed_tokens", "embedding")),
    ],
)
def test_gemma_stores_what_its_finetune_trains_in_float32(finetune, in_float32):
    """The builder needs no method: FFA's frozen lora_a is stored in float32 like the rest of LoRA."""
    bundle, _ = built("tiny_gemma3", finetune, "bfloat16")
    dtypes = {p: v.dtype for p, v in flatten_dict(bundle.params).items()}
    assert {p for p, d in dtypes.items() if d == jnp.float32} == {p for p in dtypes if in_float32(p)}
    assert {d for p, d in dtypes.items() if not in_float32(p)} <= {jnp.dtype(jnp.bfloat16)}


def test_experiment_build_freezes_the_methods_labels(tmp_path):
    cfg = compose_config([*TINY, "model=tiny_encoder", "dataset=sst2_rt", "dp=ffa"], tmp_path)
    exp = experiment.build(cfg)
    assert exp.model.trainable_labels == {"lora_b", "head"}
    trained = set(exp.state.trainable)
    assert trained and all(p[-1] == "lora_b" or p[0] == "classifier" for p in trained)
    assert sum(p[-1] == "lora_a" for p in exp.frozen) == LORA_COUNTS["tiny_encoder"]
