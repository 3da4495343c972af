"""`swtool scan` as a library call for one model: open, scan, compare with the super weight directory."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from swtool import directory as sw_directory
from swtool.detect import ScanResult, scan
from swtool.errors import SwtoolError
from swtool.formats.open import open_checkpoint
from swtool.readahead import ReadAhead

Progress = Callable[[int, int], None]


def scan_model(
    model: Path,
    known: sw_directory.Directory,
    expect: str | None,
    bars: Callable[[str], AbstractContextManager[Progress]],
    *,
    allow_nonfinite: bool = False,
    ahead: ReadAhead | None = None,
    **options,
) -> tuple[ScanResult, dict]:
    """The scan of `model` and its JSON document, with `expected` where the directory knows the model."""
    checkpoint = open_checkpoint(model, allow_nonfinite=allow_nonfinite)
    if ahead is not None:
        ahead.stop()  # from here the loaders read, faster on their own
    with bars(f"scan {model.name}") as progress:
        result = scan(checkpoint, progress=progress, **options)
    doc = result.to_json()
    comparison = sw_directory.expected(known, doc["super_weights"], [checkpoint.config.name, model.name, model.stem], expect)
    if comparison is not None:
        doc["expected"] = comparison
    return result, doc


def check_device(device: str) -> None:
    """Refuse `--device cuda` before any work where torch sees no CUDA device."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SwtoolError("--device cuda: no CUDA device is available (the CPU is the default)")
