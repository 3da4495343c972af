"""The one table of element types files store, by their safetensors/GGUF name; importable without torch.

Header parsing (and the read-ahead that runs while torch imports) needs names and sizes only;
numpy's and torch's dtypes are looked up when first asked for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Storage:
    """One element type as files store it: the name safetensors and GGUF spell it with, how its raw
    bytes are viewed in numpy (bfloat16 as little-endian uint16, numpy has no bfloat16), torch's dtype."""

    name: str
    size: int
    numpy_code: str
    torch_name: str

    @property
    def numpy(self):  # -> numpy.dtype
        import numpy

        return numpy.dtype(self.numpy_code)

    @property
    def torch(self):  # -> torch.dtype
        import torch

        return getattr(torch, self.torch_name)


STORAGE: dict[str, Storage] = {
    s.name: s
    for s in (
        Storage("F64", 8, "<f8", "float64"),
        Storage("F32", 4, "<f4", "float32"),
        Storage("F16", 2, "<f2", "float16"),
        Storage("BF16", 2, "<u2", "bfloat16"),
        Storage("I64", 8, "<i8", "int64"),
        Storage("I32", 4, "<i4", "int32"),
        Storage("I16", 2, "<i2", "int16"),
        Storage("I8", 1, "i1", "int8"),
        Storage("U8", 1, "u1", "uint8"),
        Storage("BOOL", 1, "?", "bool"),
        Storage("F8_E4M3", 1, "u1", "float8_e4m3fn"),  # compressed-tensors' FP8 weights; numpy has no float8: raw bytes
    )
}

FLOATS = ("F32", "F16", "BF16")
"""The float types a model's weights are stored in and computed from."""
