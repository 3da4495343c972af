"""The built-in English text: a few hundred tokens of plain prose shipped with the package, so that
checks needing ordinary text (scan's perplexity verification, calibration) stay data-free.

The text (`builtin_text.txt`) was written for swtool (it is not taken from any corpus): a
short description of a harbour lighthouse, about 1,600 characters, 345 tokens with SmolLM2's
tokenizer. Plain narrative prose with no markup, lists or numbers, so that a model's
perplexity on it reflects ordinary language.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def builtin_text() -> str:
    """The built-in text, read once from the package data."""
    return resources.files("swtool").joinpath("data/builtin_text.txt").read_text(encoding="utf-8")
