"""Tokenizing text for a checkpoint: its `tokenizer.json` as shipped, or the one its reader rebuilt (GGUF)."""

from __future__ import annotations

from tokenizers import Tokenizer

from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    try:
        return checkpoint.tokenizer()
    except Exception as exc:  # the tokenizers library raises bare Exceptions on malformed JSON
        if isinstance(exc, SwtoolError):
            raise
        raise SwtoolError(f"{checkpoint.path}: tokenizer could not be loaded ({str(exc).splitlines()[0]})") from None


def encode(checkpoint: Checkpoint, text: str) -> list[int]:
    ids = load_tokenizer(checkpoint).encode(text).ids
    if not ids:
        raise SwtoolError("the prompt tokenizes to nothing")
    return ids
