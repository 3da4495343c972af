"""The tiny llama with one planted super weight that the quantize and compressed-tensors tests share,
and the `swtool scan --json` document naming that weight."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import tiny

SUPER = (1, 5, 7)  # layer, row, col
DOWN = f"model.layers.{SUPER[0]}.mlp.down_proj.weight"


def planted_llama(directory: Path) -> Path:
    """A tiny llama (tests/helpers/tiny.py) with the weight SUPER planted, saved in `directory`."""
    tiny.plant(tiny.build("llama", directory), directory, [SUPER])
    return directory


def scan_doc(tensor: str = DOWN, row: int = SUPER[1], col: int = SUPER[2]) -> dict:
    """A `swtool scan --json` document listing one super weight (SUPER unless told otherwise)."""
    return {"model": "x", "super_weights": [{"layer": SUPER[0], "tensor": tensor, "row": row, "col": col}], "candidates": []}
