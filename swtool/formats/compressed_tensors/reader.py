"""compressed-tensors directories read as ordinary checkpoints, dequantized tensor by tensor, without the package.

A quantized module's weight is rebuilt when asked for, as `(q - z) * s` in the
scale's dtype (the package's own arithmetic, see swtool.codecs.compressed), from
its packed int32 codes (pack-quantized), its int8 or E4M3 values (naive-,
int- and float-quantized), its scales and its zero points; every other tensor
is read as stored. This is what lets scan, eval, dequantize, re-quantize and
`swtool.load_state_dict` take such a directory; `store` gives the raw tensors
to edit, which rewrites only unquantized modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swtool.codecs.compressed import dequantize_int, dequantize_values, unpack_int32, unpack_zero
from swtool.errors import SwtoolError
from swtool.formats.base import STORAGE, Checkpoint, Rows, float_dtype
from swtool.formats.compressed_tensors import schema
from swtool.formats.hf.header import Shards, read_config
from swtool.formats.hf.reader import SafetensorsCheckpoint



def is_compressed_tensors(directory: Path) -> bool:
    """Whether `directory`'s config.json declares compressed-tensors quantization (False when it has none to read)."""
    if not (directory / "config.json").is_file():
        return False
    return schema.is_compressed_tensors(read_config(directory))


@dataclass(frozen=True)
class Quantized:
    """How one quantized weight is stored."""

    module: str
    scheme: schema.WeightScheme
    shape: tuple[int, int]
    packed: bool
    """weight_packed (int32 codes) rather than weight (int8 or E4M3 values)."""


class CompressedTensorsCheckpoint(Checkpoint):
    format = schema.METHOD

    def __init__(self, directory: Path, shards: Shards | None = None):
        self.path = directory
        self.store = SafetensorsCheckpoint(directory, shards)
        self.raw_config = self.store.raw_config
        self.config = self.store.config
        self.files = self.store.files
        self.quantization = schema.parse(self.raw_config, f"{directory}/config.json")
        raw = set(self.store.names())
        self._entries: dict[str, Quantized | None] = {}
        """Canonical name -> how it is quantized, or None (stored as itself)."""
        for name in self.store.names():
            module, _, leaf = name.rpartition(".")
            if leaf == schema.PACKED_LEAF:
                self._entries[module + ".weight"] = self._packed(module, raw)
            elif leaf == "weight" and f"{module}.{schema.SCALE_LEAF}" in raw:
                shape = self.store.shape(name)
                if len(shape) != 2:
                    raise SwtoolError(f"{directory}: quantized weight {name} has shape {list(shape)}; swtool reads 2-D weights")
                self._entries[name] = Quantized(module, schema.scheme_for(self.quantization, module, str(directory)), (shape[0], shape[1]), False)
            elif leaf not in schema.PARAMETER_LEAVES:
                self._entries[name] = None

    def _packed(self, module: str, raw: set[str]) -> Quantized:
        for leaf in (schema.SCALE_LEAF, schema.SHAPE_LEAF):
            if f"{module}.{leaf}" not in raw:
                raise SwtoolError(f"{self.path}: packed weight {module} lacks {module}.{leaf}")
        shape = tuple(int(d) for d in self.store.load(f"{module}.{schema.SHAPE_LEAF}", torch.int64).tolist())
        if len(shape) != 2:
            raise SwtoolError(f"{self.path}: packed weight {module} has shape {list(shape)}; swtool reads 2-D weights")
        scheme = schema.scheme_for(self.quantization, module, str(self.path))
        if scheme.type != "int":
            raise SwtoolError(f"{self.path}: packed weight {module} belongs to a {scheme.type} scheme; packing holds integers")
        return Quantized(module, scheme, (shape[0], shape[1]), True)

    def quantized(self, name: str) -> bool:
        return self._entries[name] is not None

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entries[name]
        return entry.shape if entry is not None else self.store.shape(name)

    def stored_name(self, name: str) -> str:
        return name

    def stored_dtype(self, name: str) -> str:
        entry = self._entries[name]
        if entry is None:
            return self.store.stored_dtype(name)
        return f"{entry.scheme.type.upper()}{entry.scheme.num_bits}"

    def default_dtype(self, name: str) -> torch.dtype:
        """The dtype a quantized weight is rebuilt in (its scales'): the model's own, as the package keeps it."""
        entry = self._entries[name]
        return STORAGE[self.store.stored_dtype(f"{entry.module}.{schema.SCALE_LEAF}")].torch if entry else float_dtype(self.store.stored_dtype(name), torch.float32)

    def native_dtype(self, name: str) -> torch.dtype:
        """A quantized weight's rebuilt dtype (its scales'), so re-quantizing keeps the source's dtype."""
        return self.default_dtype(name)

    def model_dtype(self) -> torch.dtype:
        """The dtype a dequantized copy uses by default: the scales' (the package rebuilds weights in it)."""
        for name, entry in self._entries.items():
            if entry is not None:
                return self.default_dtype(name)
        return torch.float32

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        entry = self._entries[name]
        if entry is None:
            return self.store._read(name, rows)
        weight = self.dequantize(entry)
        return weight if rows is None else weight[rows]

    def dequantize(self, entry: Quantized) -> torch.Tensor:
        module, scheme = entry.module, entry.scheme
        scale = self.store.load(f"{module}.{schema.SCALE_LEAF}", STORAGE[self.store.stored_dtype(f"{module}.{schema.SCALE_LEAF}")].torch)
        zero = None
        if not scheme.symmetric and self.store.has(f"{module}.{schema.ZERO_LEAF}"):
            stored = self.store.load(f"{module}.{schema.ZERO_LEAF}", torch.int32 if self.store.stored_dtype(f"{module}.{schema.ZERO_LEAF}") == "I32" else torch.int8)
            zero = unpack_zero(stored, scheme.num_bits, entry.shape[0]) if entry.packed and stored.dtype == torch.int32 else stored.to(torch.int8)
        try:
            if entry.packed:
                codes = unpack_int32(self.store.load(f"{module}.{schema.PACKED_LEAF}", torch.int32), scheme.num_bits, entry.shape[1])
                if tuple(codes.shape) != entry.shape:
                    raise SwtoolError(f"packed rows do not match weight_shape {list(entry.shape)}")
                return dequantize_int(codes, scale, zero, scheme.num_bits)
            stored_dtype = self.store.stored_dtype(f"{module}.weight")
            if stored_dtype not in ("F8_E4M3", "I8"):
                raise SwtoolError(f"weight stored as {stored_dtype}; quantized values are F8_E4M3 or I8")
            values = self.store._read(f"{module}.weight", None)  # E4M3 has no Inf and torch cannot sum it: nothing for load's check
            return dequantize_values(values, scale, zero)
        except SwtoolError as exc:
            raise SwtoolError(f"{self.path}: quantized weight {module}: {exc}") from None

    def tokenizer_json(self) -> str:
        return self.store.tokenizer_json()

    def close(self) -> None:
        self.store.close()
