"""The Gemma 3 tokenizer (``dpbench.data.base.Tokenizer``), from a checkpoint folder or a GGUF vocabulary.

Gemma's tokenizer is a SentencePiece BPE model (262,144 pieces, byte fallback, no dummy prefix). A
folder supplies it as ``tokenizer.json`` (read with the tokenizers library) or ``tokenizer.model``
(read with sentencepiece). A GGUF file carries only the pieces, their scores and types; from those
``from_gguf_metadata`` rebuilds an equivalent tokenizers BPE:

- control pieces (type 3: ``<pad>``, ``<bos>``, ``<end_of_turn>``, ...) and user-defined pieces
  (type 4: ``\\n``, runs of spaces or tabs, HTML tags) are matched whole in the raw text, as
  SentencePiece (and llama.cpp) do; control ones are special and dropped by ``decode``;
- elsewhere spaces become ``▁`` and pieces merge by BPE, a pair ``(l, r)`` ranking by the score of
  ``l + r`` (SentencePiece merges the highest-scoring pair first; Gemma's normal pieces have scores
  decreasing with their id, so the rank is the merged piece's id);
- characters no piece covers fall back to the ``<0xNN>`` byte pieces (type 6).

``encode(text)`` prepends ``<bos>`` (Gemma adds no ``<eos>``); ``decode`` skips special tokens.

``Gemma3ByteTokenizer`` needs no file: UTF-8 bytes after Gemma's special ids, for the tiny random
model of tests and smoke runs (a 261-row embedding instead of 262,144 makes them fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # GGUF / SentencePiece piece types
SPACE = "\u2581"


class _FastBackend:
    def __init__(self, tokenizer: Tokenizer):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    def __init__(self, model_file: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)  # control pieces decode to nothing

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


class Gemma3Tokenizer:
    """Gemma 3 has ``pad_id`` 0, ``eos_id`` 1, ``bos_id`` 2, ``end_of_turn_id`` 106 (read from its pieces)."""

    def __init__(self, backend: Any, source: str, add_bos: bool = True, source_dir: Path | None = None):
        self._backend = backend
        self.source_dir = source_dir  # the checkpoint folder it came from (None: a GGUF vocabulary)
        self.source = source
        self.add_bos = add_bos
        ids = {
            name: backend.piece_id(name)
            for name in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
        }
        missing = [name for name in ("<pad>", "<eos>", "<bos>") if ids[name] is None]
        if missing:
            raise ValueError(f"{source}: the vocabulary has no {missing} piece; is it a Gemma tokenizer?")
        self.pad_id: int = ids["<pad>"]
        self.eos_id: int | None = ids["<eos>"]
        self.bos_id: int | None = ids["<bos>"]
        self.start_of_turn_id: int | None = ids["<start_of_turn>"]
        self.end_of_turn_id: int | None = ids["<end_of_turn>"]

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> Gemma3Tokenizer:
        """``tokenizer.json`` (preferred) or ``tokenizer.model`` of a checkpoint folder."""
        checkpoint_dir = Path(checkpoint_dir)
        if (checkpoint_dir / "tokenizer.json").exists():
            path = checkpoint_dir / "tokenizer.json"
            backend = _FastBackend(Tokenizer.from_file(str(path)))
            return cls(backend, str(path), _add_bos(checkpoint_dir), checkpoint_dir)
        if (checkpoint_dir / "tokenizer.model").exists():
            path = checkpoint_dir / "tokenizer.model"
            return cls(_SentencePieceBackend(path), str(path), _add_bos(checkpoint_dir), checkpoint_dir)
        raise FileNotFoundError(f"{checkpoint_dir} has neither tokenizer.json nor tokenizer.model")

    def save(self, directory: str | Path) -> None:
        """Write what :meth:`from_dir` reads into ``directory``: a folder's own tokenizer files, or (from
        a GGUF vocabulary) the equivalent ``tokenizer.json`` and whether to add ``<bos>``."""
        from dpbench.models.hf_tokenizer import copy_tokenizer_files

        directory = Path(directory)
        if self.source_dir is not None:
            copy_tokenizer_files(self.source_dir, directory)
            return
        tok = Tokenizer.from_str(self._backend.tok.to_str())
        if self.add_bos:  # for Hugging Face loaders, which encode through the file's post-processor
            tok.post_processor = processors.TemplateProcessing(
                single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", self.bos_id)]
            )
        tok.save(str(directory / "tokenizer.json"))
        config = {"add_bos_token": self.add_bos, "add_eos_token": False}
        config.update({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "gguf vocabulary") -> Gemma3Tokenizer:
        """The SentencePiece-equivalent tokenizer of a GGUF file's ``tokenizer.ggml.*`` metadata."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(
                f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') is supported"
            )
        if metadata.get("tokenizer.ggml.add_space_prefix", False):
            raise ValueError(f"{source}: add_space_prefix=True is not Gemma's tokenizer")
        tok = sentencepiece_bpe(
            metadata["tokenizer.ggml.tokens"],
            metadata["tokenizer.ggml.scores"],
            metadata["tokenizer.ggml.token_type"],
        )
        result = cls(_FastBackend(tok), source, bool(metadata.get("tokenizer.ggml.add_bos_token", True)))
        for role, key in (("pad_id", "padding"), ("eos_id", "eos"), ("bos_id", "bos")):
            declared = metadata.get(f"tokenizer.ggml.{key}_token_id")
            if declared is not None and declared != getattr(result, role):
                raise ValueError(
                    f"{source}: {key} token id {declared} != id of its piece {getattr(result, role)}"
                )
        return result


def _add_bos(checkpoint_dir: Path) -> bool:
    config = checkpoint_dir / "tokenizer_config.json"
    return bool(json.loads(config.read_text()).get("add_bos_token", True)) if config.exists() else True


def bpe_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges that make BPE behave like SentencePiece's BPE: every split ``(l, r)`` of a normal piece
    into two normal pieces, best merged score first (ties: longer left part first, as transformers).

    >>> bpe_merges(["a", "b", "ab", "abb"], [0.0, -1.0, -2.0, -3.0], [1, 1, 1, 1])
    [('a', 'b'), ('ab', 'b')]
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types, strict=True)) if t == NORMAL}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], i, -len(left), left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def sentencepiece_bpe(pieces: list[str], scores: list[float], types: list[int]) -> Tokenizer:
    """A tokenizers ``Tokenizer`` equivalent to the SentencePiece BPE model with these pieces."""
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(f"{len(pieces)} pieces, {len(scores)} scores, {len(types)} types")
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=bpe_merges(pieces, scores, types),
            unk_token=pieces[3] if types[3] == CONTROL and pieces[3] == "<unk>" else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Matched whole in the raw text, before the normalizer (SentencePiece's user-defined symbols).
    tok.add_special_tokens(
        [
            AddedToken(p, normalized=False, special=True)
            for p, t in zip(pieces, types, strict=True)
            if t == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(p, normalized=False, special=False)
            for p, t in zip(pieces, types, strict=True)
            if t == USER_DEFINED
        ]
    )
    return tok


class Gemma3ByteTokenizer:
    """UTF-8 bytes as tokens after Gemma's special ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
    ``<start_of_turn>`` 3, ``<end_of_turn>`` 4, byte ``b`` at ``b + 5``.

    >>> tok = Gemma3ByteTokenizer()
    >>> tok.encode("hi")
    [2, 109, 110]
    >>> tok.decode(tok.encode("héllo") + [tok.end_of_turn_id, tok.pad_id])
    'héllo'
    >>> tok.vocab_size
    261
    """

    pad_id = 0
    eos_id = 1
    bos_id = 2
    start_of_turn_id = 3
    end_of_turn_id = 4
    offset = 5
    vocab_size = 256 + offset
    source = "bytes (no file)"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_special_tokens else ids

    def save(self, directory: str | Path) -> None:
        """Nothing to write: the byte tokenizer needs no file."""

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")
