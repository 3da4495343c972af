"""The built-in English text: a few hundred tokens of plain prose shipped with the package, so that
checks needing ordinary text (scan's perplexity verification, calibration) stay data-free.

The text (`builtin_text.txt`) was written for swtool (it is not taken from any corpus):
eight paragraphs of encyclopedic prose on the bicycle, plain ASCII with no markup or lists.
The first three (1,631 characters, 378 SmolLM2 tokens) are what scan verifies on (its first
64 tokens by default); the later five were added so that `swtool imatrix --builtin` has at
least two 512-token chunks; they do not change the verification. Encyclopedic
rather than narrative on purpose: the paper measures super weights on Wikipedia-like text,
and on a first, narrative draft (a harbour lighthouse) zeroing SmolLM2's layer-2 spike
weights raised perplexity 2.5-2.8x against 1.3-1.5x on this text and on Wikipedia, while
the super weight's ratio fell to 3.8 (256 tokens, float32).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from swtool.errors import SwtoolError


@cache
def builtin_text() -> str:
    """The built-in text, read once from the package data."""
    return resources.files("swtool").joinpath("data/builtin_text.txt").read_text(encoding="utf-8")


def builtin_text_path() -> Path:
    """The built-in text's file (for commands that take a text file and record its digest)."""
    return Path(str(resources.files("swtool").joinpath("data/builtin_text.txt")))


def read_utf8(path: Path) -> str:
    """A user's text file (eval's --text, imatrix's --text), whole; unreadable or not UTF-8 is one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SwtoolError(f"{path}: cannot read as UTF-8 text ({exc.__class__.__name__})") from None
