"""Looking inside GGUF files in tests: swtool's writer in one call, the keys as Python values, the tensors as bytes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from swtool.formats.gguf.writer import plan_gguf, save_gguf


def write(checkpoint, path: Path, type_name: str, **options):
    """Plan and write `checkpoint` as a GGUF of `type_name`; (the plan, gguf-py's reader of the file)."""
    plan = plan_gguf(checkpoint, type_name, **options)
    save_gguf(checkpoint, plan, path)
    return plan, gguf.GGUFReader(path)


def fields(reader: gguf.GGUFReader) -> dict:
    """Every key/value but the GGUF.* header entries gguf-py adds, as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensor_bytes(reader: gguf.GGUFReader) -> dict[str, tuple[str, list[int], bytes]]:
    """Each tensor's type, GGUF shape and stored bytes, by name."""
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.asarray(t.data).tobytes()) for t in reader.tensors}
