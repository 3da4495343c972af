"""PyTorch pickle weights, refused by every reader and never copied as side files: unpickling runs code."""

from __future__ import annotations

from pathlib import Path

from swtool.errors import SwtoolError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_refusal(path: Path) -> SwtoolError:
    """Why a PyTorch pickle is refused and how to convert it: unpickling runs whatever code the file holds."""
    return SwtoolError(
        f"{path}: PyTorch pickle weights; swtool never unpickles them (unpickling can run arbitrary code). "
        "Convert to safetensors first, only where you trust the file: transformers' "
        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), or "
        "safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'model.safetensors')"
    )
