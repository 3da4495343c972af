"""A lazy, read-only state dict over any checkpoint swtool reads: each tensor is loaded when looked up.

`dict(load_state_dict(path))` materialises a whole model (what
`model.load_state_dict` needs); iterating and looking up one name at a time keeps
one tensor in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from swtool.formats.base import Checkpoint
from swtool.formats.hf.export import exported_names
from swtool.formats.open import open_checkpoint


class LazyStateDict(Mapping[str, torch.Tensor]):
    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype | None = None):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self._names = exported_names(checkpoint)

    def dtype_of(self, name: str) -> torch.dtype:
        """The asked dtype; else a quantized checkpoint's recorded source dtype; else the stored float dtype (fp32 otherwise)."""
        if self.dtype is not None:
            return self.dtype
        return self.checkpoint.default_dtype(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.checkpoint.load(name, self.dtype_of(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> LazyStateDict:
    return LazyStateDict(open_checkpoint(path), dtype)
