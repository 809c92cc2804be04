"""Tokenizers for the encoder, implementing ``dpbench.data.base.Tokenizer``.

``HFTokenizer`` wraps a Hugging Face ``tokenizer.json`` (fast tokenizers library, no transformers).
The file's own padding and truncation are switched off (all-MiniLM-L6-v2's pads and truncates to
128), so that data code alone decides lengths. ``ByteTokenizer`` needs no file at all: it serves
the tiny randomly initialised encoders that tests and smoke runs build offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _FastTokenizer

# Where each special token's name may be found, in order: special_tokens_map.json keys, then the
# usual BERT / RoBERTa spellings when the folder has no such file.
# The tokenizer files of a Hugging Face checkpoint folder: what ``save`` copies next to a saved model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_tokenizer_files(source: Path, directory: Path) -> list[str]:
    """Copy the ``TOKENIZER_FILES`` that ``source`` (a checkpoint folder) holds into ``directory``."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(directory) / name)
            copied.append(name)
    return copied


_ROLES = {
    "pad": (("pad_token",), ("[PAD]", "<pad>")),
    "bos": (("bos_token", "cls_token"), ("[CLS]", "<s>")),
    "eos": (("eos_token", "sep_token"), ("[SEP]", "</s>")),
}


class HFTokenizer:
    """A ``tokenizer.json`` with explicit special-token ids; bos/eos are [CLS]/[SEP] (BERT) or <s>/</s>."""

    def __init__(
        self, tokenizer: _FastTokenizer, special_tokens: dict | None = None, source_dir: Path | None = None
    ):
        self.source_dir = (
            source_dir  # the checkpoint folder it came from (its files are what ``save`` copies)
        )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        special_tokens = special_tokens or {}
        ids = {}
        for role, (keys, spellings) in _ROLES.items():
            names = [_content(special_tokens[k]) for k in keys if k in special_tokens] + list(spellings)
            found = [tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None]
            ids[role] = found[0] if found else None
        if ids["pad"] is None:
            raise ValueError(f"tokenizer has no pad token (looked for {_ROLES['pad']})")
        self.pad_id: int = ids["pad"]
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> HFTokenizer:
        """The ``tokenizer.json`` of a checkpoint folder, with its ``special_tokens_map.json`` if any."""
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{checkpoint_dir} has no tokenizer.json (slow-tokenizer files are not read)"
            )
        special_map = checkpoint_dir / "special_tokens_map.json"
        special = json.loads(special_map.read_text()) if special_map.exists() else None
        return cls(_FastTokenizer.from_file(str(path)), special, checkpoint_dir)

    def save(self, directory: str | Path) -> None:
        """Write what :meth:`from_dir` reads into ``directory``: the checkpoint's own tokenizer files."""
        if self.source_dir is not None:
            copy_tokenizer_files(self.source_dir, Path(directory))
            return
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        names = {
            role: self._tok.id_to_token(i)
            for role, i in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id))
            if i is not None
        }
        special = {"pad_token": names["pad"]}
        special.update({"cls_token": names["bos"]} if "bos" in names else {})
        special.update({"sep_token": names["eos"]} if "eos" in names else {})
        (Path(directory) / "special_tokens_map.json").write_text(json.dumps(special, indent=1))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _content(token) -> str:
    """special_tokens_map.json values are either strings or {"content": ...} dicts."""
    return token["content"] if isinstance(token, dict) else token


class ByteTokenizer:
    """UTF-8 bytes as tokens, with RoBERTa's special ids (<s>=0, <pad>=1, </s>=2) and byte b at b + 3.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [0, 107, 108, 2]
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    >>> tok.vocab_size
    259
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def save(self, directory: str | Path) -> None:
        """Nothing to write: the byte tokenizer needs no file."""

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")
