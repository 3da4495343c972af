"""A big output file written front to back, around the page cache where the file system allows it.

A buffered write of a model-sized output costs more than its bytes: every page
of it is a fresh page of the page cache, which on a virtual machine whose host
reclaims idle memory costs a fault in the host too (measured here: 2.1 s of CPU
to write 768 MB buffered into idle memory, 0.16 s into memory just freed,
0.1-0.2 s of CPU with O_DIRECT). And a finished output left in the page cache
pushes out the inputs the next command would read. So the bytes go through two
reused page-aligned staging buffers, written with O_DIRECT by one background
thread while the caller encodes the next tensor; only the unaligned tail (and
everything, on file systems that refuse O_DIRECT) goes through the page cache.
The file's bytes are the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from swtool import heap

STAGE_BYTES = 8 << 20
"""One staging buffer: a multiple of every block size O_DIRECT may demand, large enough that a write
call moves far more bytes than it costs."""
ALIGN = 4096
"""O_DIRECT's rule for file offsets, lengths and memory addresses (the logical block size, at most a page)."""
O_DIRECT = getattr(os, "O_DIRECT", 0)


class OutputFile:
    """A write-only file for one long sequential write (`write` then `close`), as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct = _set_direct(self._fd, True)
        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
        self._pending: list[Future[None] | None] = [None, None]
        self._current = 0
        self._filled = 0
        self._offset = 0
        """File offset of the current staging buffer's first byte."""
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="swtool-write")
        heap.keep_freed_buffers()  # what fills this file is a stream of tensor-sized buffers

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            stage = self._stages[self._current]
            count = min(len(view), STAGE_BYTES - self._filled)
            stage[self._filled : self._filled + count] = view[:count]
            self._filled += count
            view = view[count:]
            if self._filled == STAGE_BYTES:
                self._flush_stage()

    def tell(self) -> int:
        return self._offset + self._filled

    def flush(self) -> None:
        """Nothing to do: the bytes reach the file in order, and nothing reads it before `close`."""

    def _flush_stage(self) -> None:
        """Hand the full current stage to the writer thread and switch to the other, once its write is done."""
        self._pending[self._current] = self._writer.submit(self._write_at, self._current, self._offset, STAGE_BYTES)
        self._offset += STAGE_BYTES
        self._current ^= 1
        self._filled = 0
        self._wait(self._current)

    def _wait(self, index: int) -> None:
        pending, self._pending[index] = self._pending[index], None
        if pending is not None:
            pending.result()

    def _write_at(self, index: int, offset: int, length: int) -> None:
        view = memoryview(self._stages[index])[:length]
        try:
            _write_all(self._fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._direct = _set_direct(self._fd, False)  # a file system that takes the flag but not the writes
            _write_all(self._fd, view, offset)

    def close(self) -> None:
        """Write what is staged (the aligned part directly, the rest buffered) and close; errors surface here."""
        if self._fd < 0:
            return
        try:
            self._wait(self._current ^ 1)
            aligned = self._filled - self._filled % ALIGN if self._direct else 0
            if aligned:
                self._write_at(self._current, self._offset, aligned)
            if self._filled > aligned:
                if self._direct:
                    self._direct = _set_direct(self._fd, False)
                _write_all(self._fd, memoryview(self._stages[self._current])[aligned : self._filled], self._offset + aligned)
        finally:
            self._release()

    def abandon(self) -> None:
        """Stop without writing what is staged (after an error: the atomic output removes the file)."""
        if self._fd >= 0:
            self._release()

    def _release(self) -> None:
        for index in (0, 1):
            pending, self._pending[index] = self._pending[index], None
            if pending is not None:
                pending.exception()  # wait: the buffer must not be unmapped under a write
        self._writer.shutdown()
        os.close(self._fd)
        self._fd = -1
        self._stages = []  # unmapped with their last view (an error's traceback may hold one for a while)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()  # the caller's error wins


def _set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on the open file; False where the system or file system has no such thing."""
    if not O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT if on else flags & ~O_DIRECT)
    except OSError:
        return False
    return on


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
