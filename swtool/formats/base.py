"""One lazy interface over every checkpoint format swtool reads.

Callers ask for tensors by their canonical (Hugging Face) name and get torch
tensors in the dtype they want; nothing is read until asked for, and only the
rows asked for when `rows` is given. Formats differ only in how they find the
bytes and turn them into an array (`_read`).

Every tensor is checked for NaN and Inf as it streams through `load` (a cheap
sum, and a precise count only when the sum is not finite), so a damaged
checkpoint is refused with the tensor's name instead of being quantized or
scanned into nonsense; `allow_nonfinite` lets such weights through.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from swtool.errors import SwtoolError
from swtool.formats.dtypes import FLOATS, STORAGE, Storage
from swtool.families import Family, family_of
from swtool.families.config import ModelConfig

Rows = slice | Sequence[int] | np.ndarray | None


STORAGE_OF: dict[torch.dtype, Storage] = {s.torch: s for s in STORAGE.values()}


def float_dtype(stored: str, default: torch.dtype) -> torch.dtype:
    """torch's dtype for a stored float type name (F32, F16, BF16), else `default` (GGML block types...)."""
    return STORAGE[stored].torch if stored in FLOATS else default


HeldValues = dict[str, list[tuple[int, int, float]]]
"""Canonical tensor -> (row, col, fp16 value) of the super weights held out of its quantization."""


def held_table(held: HeldValues) -> str:
    """The side table of held-out weights as the quantized formats record it (`swtool.super`): JSON."""
    return json.dumps([{"tensor": name, "row": r, "col": c, "value": v} for name, rows in held.items() for r, c, v in rows])


@dataclass(frozen=True)
class Held:
    """One weight by its coordinates: a super weight held out, zeroed or recorded."""

    tensor: str
    """Canonical (HF) name."""
    row: int
    col: int

CHECK_CHUNK = 1 << 22
"""Elements examined at once when counting NaN/Inf: bounds the temporary mask."""


class Checkpoint(ABC):
    path: Path
    format: str
    config: ModelConfig
    files: list[Path]

    _entries: dict[str, object]
    """Canonical name -> whatever the format needs to find the tensor's bytes."""

    allow_nonfinite: bool = False
    """Let NaN/Inf weights through `load` instead of refusing them."""

    meta: dict[str, Any] = {}
    """The file's own key/value metadata (GGUF's); empty for formats without any."""

    @cached_property
    def family(self) -> Family:
        return family_of(self.config)

    def expert_of(self, name: str) -> int | None:
        """The routed expert a canonical tensor belongs to where the file merges experts into one tensor."""
        return None

    def default_dtype(self, name: str) -> torch.dtype:
        """The dtype a tensor is handed out in when the caller names none: its stored float type
        (a quantized format's recorded source dtype), fp32 otherwise."""
        return float_dtype(self.stored_dtype(name), torch.float32)

    def model_dtype(self) -> torch.dtype:
        """The dtype a dequantized copy is written in unless asked otherwise: a quantized format's recorded
        source dtype; fp16 where nothing is recorded (GGUF)."""
        return torch.float16

    def native_dtype(self, name: str) -> torch.dtype:
        """The dtype a tensor is stored in, where that is a float dtype torch has; fp16 for GGUF block types
        (what writers hand to the codecs and store unquantized tensors in)."""
        return float_dtype(self.stored_dtype(name), torch.float16)

    def value(self, held: Held, dtype: torch.dtype = torch.float32) -> float:
        """One weight's value, read from its row alone, rounded to `dtype` (fp16 for the side tables).
        Not checked for NaN/Inf: every caller also reads the whole tensor, whose check names the first bad value."""
        return float(self.load(held.tensor, torch.float32, rows=[held.row], checked=False)[0, held.col].to(dtype))

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

    def tokenizer(self) -> Tokenizer:
        """The tokenizer, ready to encode; built once per checkpoint (a scan encodes its prompt and its verification
        text, and building one takes about a second for a 262k-token vocabulary)."""
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> Tokenizer:
        return self.build_tokenizer()

    def build_tokenizer(self) -> Tokenizer:
        """A new tokenizer (formats that build one directly skip the JSON round trip)."""
        return Tokenizer.from_str(self.tokenizer_json())

    def has(self, name: str) -> bool:
        return name in self._entries

    def load(
        self, name: str, dtype: torch.dtype = torch.float32, rows: Rows = None, out: torch.Tensor | None = None, checked: bool = True
    ) -> torch.Tensor:
        """The tensor (or `rows` of it) in `dtype`. Safe to call from several threads at once.

        `out`, when it has the whole tensor's shape and `dtype`, may receive the values and
        be returned instead of a new tensor (where the format supports it): a fresh tensor of
        a layer's size costs more in page faults than the conversion itself, so streams reuse
        the previous layer's.

        `checked=False` skips the NaN/Inf check (`check_finite`), for callers whose own pass over
        the values finds them anyway and then load again checked, for the message.
        """
        if not self.has(name):
            raise SwtoolError(f"{self.path}: tensor {name} not found")
        reusable = out is not None and rows is None and out.dtype == dtype and out.is_contiguous() and tuple(out.shape) == tuple(self.shape(name))
        if reusable and self.refills(name, dtype):
            self._read_into(name, out)
            tensor = out
        else:
            tensor = self._read(name, rows)
        if checked and not self.allow_nonfinite:
            self._check_finite(name, tensor, rows)
        return tensor if tensor is out else tensor.to(dtype)

    def _check_finite(self, name: str, tensor: torch.Tensor, rows: Rows) -> None:
        """Refuse NaN/Inf, naming the tensor and the first bad element; a sum is the fast path."""
        if not tensor.is_floating_point() or tensor.element_size() == 1 or bool(torch.isfinite(tensor.sum())):
            return  # 1-byte floats are stored FP8 codes: torch cannot sum them; the weights rebuilt from them are checked
        flat = tensor.reshape(-1)
        count, first = 0, None
        for start in range(0, flat.numel(), CHECK_CHUNK):
            bad = ~torch.isfinite(flat[start : start + CHECK_CHUNK])
            found = int(bad.sum())
            if found and first is None:
                first = start + int(bad.nonzero()[0, 0])
            count += found
        if not count:  # the sum overflowed (fp16), the values are fine
            return
        where = ""
        if rows is None or isinstance(rows, slice):
            index = [int(i) for i in np.unravel_index(first, tuple(tensor.shape))]
            if isinstance(rows, slice) and index:
                index[0] += rows.start or 0
            where = f" (first at {index})"
        raise SwtoolError(
            f"{self.path}: tensor {self.stored_name(name)} holds {count} NaN/Inf value(s){where}; "
            "the checkpoint is damaged (--allow-nonfinite to go on anyway)"
        )

    def refills(self, name: str, dtype: torch.dtype) -> bool:
        """Whether `load(name, dtype, out=...)` fills `out` (without a whole-size temporary) rather than
        making a new tensor: a stream passes the previous layer's tensors only where they are refilled,
        since otherwise they would just stay alive while the next layer loads."""
        return False

    def _read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` with the whole tensor (only where `refills` says so)."""
        raise NotImplementedError

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        actual = self.shape(name)
        if tuple(actual) != tuple(expected):
            raise SwtoolError(
                f"{self.path}: tensor {self.stored_name(name)} has shape {list(actual)}, the config implies {list(expected)}"
            )

    def close(self) -> None:
        """Drop memory maps; a no-op where the format keeps none."""
