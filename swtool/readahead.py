"""Ask the kernel to read a checkpoint ahead, in the order a layer walk needs it, while torch imports.

Why: a cold scan otherwise reads nothing while Python imports torch (about 2 s).
`posix_fadvise(WILLNEED)` starts the disk reads without memory of ours and
without holding the GIL, so the disk works during the import. One call reads
only its first few MB, hence the 8 MB steps: on the development machine a 2.2 GB
checkpoint was 99 % in the page cache when `import torch` returned, against 0 %
without (and 1 % with one call per file). The command stops it once its own
loaders start: their parallel reads beat one read-ahead stream (7B cold scan:
15-24 s with the loaders alone, 19-28 s with the read-ahead running throughout).

Best effort and never required: no posix_fadvise (not Linux) or any error simply
stops the read-ahead. It takes byte ranges that the format's own (checked, capped)
header parsing gives (swtool.formats.open.prefetch) and imports nothing heavy, so a
command can start it before importing torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

STEP_BYTES = 8 << 20
"""Bytes per WILLNEED call (larger calls are cut short by the kernel)."""

MEMORY_SHARE = 0.5
"""At most this share of the available memory is read ahead: on a model larger than RAM, the
read-ahead must not push its own first layers out of the page cache before they are used."""

class ReadAhead:
    """Asks for the bytes of `spans` on a daemon thread until `stop()` or the end.

    Where the OS has no posix_fadvise there is no thread (`thread` is None) and stop() does nothing.
    """

    def __init__(self, spans: list[tuple[Path, int, int]]):
        self._stopped = threading.Event()
        self.files = list(dict.fromkeys(file for file, _, _ in spans))
        """The files read ahead, in order."""
        self.thread: threading.Thread | None = None
        if hasattr(os, "posix_fadvise") and spans:
            self.thread = threading.Thread(target=self._run, args=(spans,), name="swtool-readahead", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Ask for nothing more (reads already asked for go on in the kernel)."""
        self._stopped.set()

    def _run(self, spans: list[tuple[Path, int, int]]) -> None:
        try:
            budget = int(_available_memory() * MEMORY_SHARE)
            for file, start, stop in spans:
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


def start(spans: list[tuple[Path, int, int]]) -> ReadAhead:
    """Read the (file, start, stop) byte ranges ahead, in order, until stopped (see formats.open.prefetch)."""
    return ReadAhead(spans)


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
