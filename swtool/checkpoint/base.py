"""One lazy interface over every checkpoint format swtool reads.

Callers ask for tensors by their canonical (Hugging Face) name and get torch
tensors in the dtype they want; nothing is read until asked for, and only the
rows asked for when `rows` is given. Formats differ only in how they find the
bytes and turn them into an array (`_read`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from swtool.config import ModelConfig
from swtool.errors import SwtoolError

Rows = slice | Sequence[int] | np.ndarray | None


class Checkpoint(ABC):
    path: Path
    format: str
    config: ModelConfig
    files: list[Path]

    _entries: dict[str, object]
    """Canonical name -> whatever the format needs to find the tensor's bytes."""

    def names(self) -> list[str]:
        """Canonical names of every tensor in the checkpoint, in file order."""
        return list(self._entries)

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape as the tensor loads: (out, in) for linear weights."""

    @abstractmethod
    def stored_name(self, name: str) -> str:
        """The name under which the tensor is stored in the file (for reports)."""

    @abstractmethod
    def stored_dtype(self, name: str) -> str:
        """Storage type as the format spells it (BF16, F16, Q4_1...)."""

    @abstractmethod
    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        """The tensor (or the selected rows of its first axis), in any float dtype."""

    @abstractmethod
    def tokenizer_json(self) -> str:
        """The tokenizer as a `tokenizers` JSON document."""

    def has(self, name: str) -> bool:
        return name in self._entries

    def load(self, name: str, dtype: torch.dtype = torch.float32, rows: Rows = None) -> torch.Tensor:
        if not self.has(name):
            raise SwtoolError(f"{self.path}: tensor {name} not found")
        return self._read(name, rows).to(dtype)

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        actual = self.shape(name)
        if tuple(actual) != tuple(expected):
            raise SwtoolError(
                f"{self.path}: tensor {self.stored_name(name)} has shape {list(actual)}, the config implies {list(expected)}"
            )

    def close(self) -> None:
        """Drop memory maps; a no-op where the format keeps none."""
