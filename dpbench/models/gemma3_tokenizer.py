"""Moved to ``dpbench.models.gemma3.tokenizer``; this name stays while ``dpbench.train.summarization``'s
doctest imports it from here."""

from dpbench.models.gemma3.tokenizer import Gemma3ByteTokenizer, Gemma3Tokenizer

__all__ = ["Gemma3ByteTokenizer", "Gemma3Tokenizer"]
