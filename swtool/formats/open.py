"""Open any checkpoint swtool reads: an HF directory, a swtool-quantized or compressed-tensors directory or a GGUF file, checked against its config.

The readers are imported only once the path is known to exist and what it holds: they pull in
torch, and a missing path or a pickle is answered without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swtool.errors import SwtoolError
from swtool import readahead
from swtool.formats.hf.header import Shards, layer_spans, read_shards
from swtool.formats.pickles import PICKLE_SUFFIXES, pickle_refusal
from swtool.readahead import ReadAhead

if TYPE_CHECKING:  # importing the readers pulls in torch; `swtool.formats.atomic` users need none of it
    from swtool.formats.base import Checkpoint

_PARSED: dict[Path, Shards] = {}
"""Headers `prefetch` parsed for the read-ahead, handed to the reader that `open_checkpoint` makes next."""


def prefetch(path: str | Path) -> ReadAhead:
    """Start reading a model ahead (before torch is imported), from its parsed headers.

    A missing path is refused here, before torch is imported (one line, at once); otherwise this is
    best effort: a path that cannot be parsed reads nothing ahead, and `open_checkpoint` reports why.
    """
    path = Path(path)
    if not path.exists():
        raise SwtoolError(f"{path}: no such file or directory")
    try:
        if path.is_dir():
            shards = read_shards(path)
            _PARSED[path] = shards
            return readahead.start(layer_spans(shards))
        if path.is_file():  # GGUF: llama.cpp writes it in layer order, so one range
            return readahead.start([(path, 0, path.stat().st_size)])
    except (SwtoolError, OSError):
        pass
    return readahead.start([])


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
        from swtool.formats.compressed_tensors.reader import CompressedTensorsCheckpoint, is_compressed_tensors
        from swtool.formats.hf.reader import SafetensorsCheckpoint
        from swtool.formats.rtn.layout import is_quantized
        from swtool.formats.rtn.reader import QuantizedCheckpoint

        try:
            shards = _PARSED.pop(path, None) or read_shards(path)
        except SwtoolError:  # let the reader report it, config.json first, as it always has
            return SafetensorsCheckpoint(path)
        if is_compressed_tensors(path):
            return CompressedTensorsCheckpoint(path, shards)
        if is_quantized(shards.metadata):
            return QuantizedCheckpoint(path, shards)
        return SafetensorsCheckpoint(path, shards)
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
