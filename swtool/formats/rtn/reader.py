"""swtool's own quantized directories, read as ordinary checkpoints (dequantized tensor by tensor).

This is what lets `swtool scan`, evaluation and `swtool.load_state_dict` work on
a quantized model without a dequantized copy on disk: each quantized tensor is
rebuilt from its codes, scales and zero points when asked for, with its held-out
super weights restored; the other tensors are read as stored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from swtool.codecs.rtn import QuantizedTensor, block_length, dequantize
from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint, Rows
from swtool.formats.hf.header import Shards
from swtool.formats.hf.reader import SafetensorsCheckpoint
from swtool.formats.rtn import layout


class QuantizedCheckpoint(Checkpoint):
    format = layout.FORMAT

    def __init__(self, directory: Path, shards: Shards | None = None):
        self.path = directory
        self.store = SafetensorsCheckpoint(directory, shards)
        self.metadata = self.store.shards.metadata
        self.header = layout.parse_header(self.metadata, str(directory))
        self.raw_config = self.store.raw_config
        self.config = self.store.config
        self.files = self.store.files
        self._entries: dict[str, tuple[int, ...] | None] = {}
        """Canonical name -> original shape (quantized) or None (stored as itself)."""
        stored = set(self.store.names())
        for name in self.store.names():
            if name.endswith(layout.CODES):
                base = name.removesuffix(layout.CODES)
                missing = [base + s for s in layout.SUFFIXES if base + s not in stored]
                if missing:
                    raise SwtoolError(f"{directory}: quantized tensor {base} lacks {missing[0]}")
                self._entries[base] = tuple(int(d) for d in self.store.load(base + layout.SHAPE, torch.int64).tolist())
            elif not name.endswith(layout.SUFFIXES):
                self._entries[name] = None
        for name in self.header.held:
            if self._entries.get(name) is None:
                raise SwtoolError(f"{directory}: the super weight table names {name}, which is not a quantized tensor here")

    def quantized(self, name: str) -> bool:
        return self._entries[name] is not None

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._entries[name]
        return shape if shape is not None else self.store.shape(name)

    def stored_name(self, name: str) -> str:
        return name

    def stored_dtype(self, name: str) -> str:
        if self.quantized(name):
            return f"RTN{self.header.bits}"
        return self.store.stored_dtype(name)

    def default_dtype(self, name: str) -> torch.dtype:
        """The dtype a dequantized copy uses: the source's, as recorded at quantization."""
        return self.header.dtype

    def model_dtype(self) -> torch.dtype:
        return self.header.dtype

    def quantized_tensor(self, name: str) -> QuantizedTensor:
        shape = self.shape(name)
        return QuantizedTensor(
            codes=self.store.load(name + layout.CODES, torch.uint8),
            scale=self.store.load(name + layout.SCALE, torch.float16),
            zero=self.store.load(name + layout.ZERO, torch.float16),
            shape=shape,
            bits=self.header.bits,
            block=block_length(self.header.block, shape),
            held=self.header.held.get(name, []),
        )

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        if not self.quantized(name):
            return self.store._read(name, rows)
        weight = dequantize(self.quantized_tensor(name))
        return weight if rows is None else weight[rows]

    def tokenizer_json(self) -> str:
        return self.store.tokenizer_json()

    def close(self) -> None:
        self.store.close()
