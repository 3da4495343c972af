"""Ask the kernel to read a checkpoint ahead, in the order a layer walk needs it, while torch imports.

Why: a cold scan otherwise reads nothing while Python imports torch (about 2 s).
`posix_fadvise(WILLNEED)` starts the disk reads without memory of ours and
without holding the GIL, so the disk works during the import. One call reads
only its first few MB, hence the 8 MB steps: on the development machine a 2.2 GB
checkpoint was 99 % in the page cache when `import torch` returned, against 0 %
without (and 1 % with one call per file). The command stops it once its own
loaders start: their parallel reads beat one read-ahead stream (7B cold scan:
15-24 s with the loaders alone, 19-28 s with the read-ahead running throughout).

Best effort and never required: no posix_fadvise (not Linux), an unreadable
header or any other error simply stops the read-ahead. This module imports
nothing heavy, so a command can start it before importing torch.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from pathlib import Path

STEP_BYTES = 8 << 20
"""Bytes per WILLNEED call (larger calls are cut short by the kernel)."""

MEMORY_SHARE = 0.5
"""At most this share of the available memory is read ahead: on a model larger than RAM, the
read-ahead must not push its own first layers out of the page cache before they are used."""

_LAYER = re.compile(r"(?:\.layers\.|^blk\.)(\d+)\.")


class ReadAhead:
    """Asks for `model`'s bytes on a daemon thread until `stop()` or the end of the model.

    Where the OS has no posix_fadvise there is no thread (`thread` is None) and stop() does nothing.
    """

    def __init__(self, model: Path):
        self._stopped = threading.Event()
        self.thread: threading.Thread | None = None
        if hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, args=(Path(model),), name="swtool-readahead", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Ask for nothing more (reads already asked for go on in the kernel)."""
        self._stopped.set()

    def _run(self, model: Path) -> None:
        try:
            budget = int(_available_memory() * MEMORY_SHARE)
            for file, start, stop in _spans(model):
                if budget <= 0:
                    return
                stop = min(stop, start + budget)
                budget -= stop - start
                descriptor = os.open(file, os.O_RDONLY)
                try:
                    for offset in range(start, stop, STEP_BYTES):
                        if self._stopped.is_set():
                            return
                        os.posix_fadvise(descriptor, offset, min(STEP_BYTES, stop - offset), os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(descriptor)
        except Exception:  # an optimisation only: the command itself reports unreadable input, clearly
            return


def start(model: Path) -> ReadAhead:
    """Read `model` (an HF directory or a GGUF file) ahead until stopped."""
    return ReadAhead(model)


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _spans(model: Path) -> list[tuple[Path, int, int]]:
    """(file, start, stop) byte ranges in reading order: each layer's tensors, then the rest.

    A GGUF file is one range (llama.cpp writes it in layer order). For safetensors the
    headers give each tensor's place; shards store names sorted as text (layer 10 before
    layer 2), so ranges are ordered by layer number, and adjacent ones merged. The
    embedding matrix is left out where a separate LM head exists (6 % of a 1.1B model).
    """
    if model.is_file():
        return [(model, 0, model.stat().st_size)]
    index = model / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = []
    for name in files:
        path = model / name
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                raise ValueError(f"{path}: not a safetensors file")
            header = json.loads(handle.read(length))
        for tensor, entry in header.items():
            if tensor == "__metadata__":
                continue
            layer = _LAYER.search(tensor)
            begin, end = entry["data_offsets"]
            tensors.append((tensor, int(layer.group(1)) if layer else 1 << 30, str(path), 8 + length + begin, 8 + length + end))
    if any(name == "lm_head.weight" for name, *_ in tensors):  # untied: a walk reads only the prompt's embedding rows
        tensors = [t for t in tensors if not t[0].endswith("embed_tokens.weight")]
    spans: list[tuple[Path, int, int]] = []
    for _, _, path, begin, end in sorted(tensors, key=lambda t: t[1:]):
        if spans and spans[-1][0] == Path(path) and spans[-1][2] == begin:
            spans[-1] = (spans[-1][0], spans[-1][1], end)
        else:
            spans.append((Path(path), begin, end))
    return spans
