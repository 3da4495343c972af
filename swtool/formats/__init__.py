"""Open any checkpoint swtool reads: an HF directory, a swtool-quantized or compressed-tensors directory or a GGUF file, checked against its config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swtool.errors import SwtoolError

if TYPE_CHECKING:  # importing the readers pulls in torch; `swtool.formats.atomic` users need none of it
    from swtool.formats.base import Checkpoint

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_refusal(path: Path) -> SwtoolError:
    """Why a PyTorch pickle is refused and how to convert it: unpickling runs whatever code the file holds."""
    return SwtoolError(
        f"{path}: PyTorch pickle weights; swtool never unpickles them (unpickling can run arbitrary code). "
        "Convert to safetensors first, only where you trust the file: transformers' "
        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), or "
        "safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'model.safetensors')"
    )


def open_checkpoint(path: str | Path, allow_nonfinite: bool = False) -> Checkpoint:
    """Open lazily; refuse damaged files, configs that disagree with the tensors and (as they load) NaN/Inf weights."""
    from swtool.formats.layout import check_layout

    checkpoint = _open(Path(path))
    checkpoint.allow_nonfinite = allow_nonfinite
    check_layout(checkpoint)
    return checkpoint


def _open(path: Path) -> Checkpoint:
    if not path.exists():
        raise SwtoolError(f"{path}: no such file or directory")
    if path.is_dir():
        from swtool.formats.compressed_tensors.reader import CompressedTensorsCheckpoint, is_compressed_tensors

        if is_compressed_tensors(path):
            return CompressedTensorsCheckpoint(path)
        from swtool.formats.quantized_in import QuantizedCheckpoint, directory_metadata
        from swtool.formats.safetensors_in import SafetensorsCheckpoint
        from swtool.codecs.layout import is_quantized

        metadata = directory_metadata(path)
        if is_quantized(metadata):
            return QuantizedCheckpoint(path, metadata)
        return SafetensorsCheckpoint(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        from swtool.formats.gguf_in import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix == ".safetensors":
        raise SwtoolError(f"{path}: a bare safetensors file; give the model directory (with config.json) instead")
    raise SwtoolError(f"{path}: neither a model directory nor a GGUF file (bad magic {magic!r})")
