"""The one table of element types files store, by their safetensors/GGUF name; importable without torch.

Header parsing (and the read-ahead that runs while torch imports) needs names and sizes only;
torch's dtype is looked up when first asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Storage:
    """One element type as files store it: the name safetensors and GGUF spell it with, how its raw
    bytes are viewed in numpy (bfloat16 as little-endian uint16, numpy has no bfloat16), torch's dtype."""

    name: str
    numpy: np.dtype
    torch_name: str

    @property
    def size(self) -> int:
        return self.numpy.itemsize

    @property
    def torch(self):  # -> torch.dtype
        import torch

        return getattr(torch, self.torch_name)


STORAGE: dict[str, Storage] = {
    s.name: s
    for s in (
        Storage("F64", np.dtype("<f8"), "float64"),
        Storage("F32", np.dtype("<f4"), "float32"),
        Storage("F16", np.dtype("<f2"), "float16"),
        Storage("BF16", np.dtype("<u2"), "bfloat16"),
        Storage("I64", np.dtype("<i8"), "int64"),
        Storage("I32", np.dtype("<i4"), "int32"),
        Storage("I16", np.dtype("<i2"), "int16"),
        Storage("I8", np.dtype("i1"), "int8"),
        Storage("U8", np.dtype("u1"), "uint8"),
        Storage("BOOL", np.dtype("?"), "bool"),
    )
}

FLOATS = ("F32", "F16", "BF16")
"""The float types a model's weights are stored in and computed from."""
