"""Open any checkpoint swtool reads: an HF directory, a swtool-quantized directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from swtool.checkpoint.base import Checkpoint
from swtool.errors import SwtoolError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise SwtoolError(f"{path}: no such file or directory")
    if path.is_dir():
        from swtool.checkpoint.quantized_in import QuantizedCheckpoint, directory_metadata
        from swtool.checkpoint.safetensors_in import SafetensorsCheckpoint
        from swtool.quant.layout import is_quantized

        metadata = directory_metadata(path)
        if is_quantized(metadata):
            return QuantizedCheckpoint(path, metadata)
        return SafetensorsCheckpoint(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise SwtoolError(
            f"{path}: PyTorch pickle checkpoint; swtool never unpickles (it can run arbitrary code). "
            "Convert it to safetensors first, e.g. with transformers' save_pretrained(out, safe_serialization=True)"
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from swtool.checkpoint.gguf_in import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix == ".safetensors":
        raise SwtoolError(f"{path}: a bare safetensors file; give the model directory (with config.json) instead")
    raise SwtoolError(f"{path}: neither a model directory nor a GGUF file (bad magic {magic!r})")
