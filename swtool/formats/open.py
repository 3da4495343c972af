"""Open any checkpoint swtool reads: an HF directory, a swtool-quantized directory or a GGUF file, checked against its config.

The readers are imported only once the path is known to exist and what it holds: they pull in
torch, and a missing path or a pickle is answered without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swtool.errors import SwtoolError
from swtool.formats.pickles import PICKLE_SUFFIXES, pickle_refusal

if TYPE_CHECKING:  # importing the readers pulls in torch; `swtool.formats.atomic` users need none of it
    from swtool.formats.base import Checkpoint

def open_checkpoint(path: str | Path, allow_nonfinite: bool = False) -> Checkpoint:
    """Open lazily; refuse damaged files, configs that disagree with the tensors and (as they load) NaN/Inf weights."""
    from swtool.formats.check import check_layout

    checkpoint = _open(Path(path))
    checkpoint.allow_nonfinite = allow_nonfinite
    check_layout(checkpoint)
    return checkpoint


def _open(path: Path) -> Checkpoint:
    if not path.exists():
        raise SwtoolError(f"{path}: no such file or directory")
    if path.is_dir():
        from swtool.formats.hf.reader import SafetensorsCheckpoint
        from swtool.formats.rtn.layout import is_quantized
        from swtool.formats.rtn.reader import QuantizedCheckpoint, directory_metadata

        metadata = directory_metadata(path)
        if is_quantized(metadata):
            return QuantizedCheckpoint(path, metadata)
        return SafetensorsCheckpoint(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        from swtool.formats.gguf.reader import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix == ".safetensors":
        raise SwtoolError(f"{path}: a bare safetensors file; give the model directory (with config.json) instead")
    raise SwtoolError(f"{path}: neither a model directory nor a GGUF file (bad magic {magic!r})")
