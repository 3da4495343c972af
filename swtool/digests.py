"""sha256 of input files, hashed on one background thread, each file once per process.

Why: every output records the sha256 of the files it was made from (see swtool.provenance),
and hashing a model is a full pass over its bytes, about a second of CPU per 1.5 GB. Done up
front it made `swtool quantize` read the model twice and wait. Here a command asks for a
file's digest as soon as it knows the file (swtool.cli.start asks for the weight files before
it imports torch, so the second core hashes while the first imports) and takes the result
only when it writes its metadata; asking again for an unchanged file reuses the same
computation. Nothing here imports more than the standard library, so the command line can
start it first.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 24
"""Bytes mapped and hashed at a time (a multiple of mmap.ALLOCATIONGRANULARITY): hashing can
stop between chunks, hashlib releases the GIL for each, and at most one chunk of the file is
in the process's resident set."""


class Cancelled(Exception):
    """Hashing was stopped (`stop`) before this file's digest was complete."""


_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_jobs: dict[tuple[int, ...], Future[str]] = {}
_generation = 0
"""Raised by `stop`: a job started under an older generation gives up at its next chunk."""


def sha256_file(path: Path, generation: int | None = None) -> str:
    """The file's sha256, read through maps of CHUNK bytes: no copy of the bytes, and pages that
    the command reads too come from the disk once."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        size = fh.seek(0, 2)
        for start in range(0, size, CHUNK):
            if generation is not None and generation != _generation:
                raise Cancelled(str(path))
            with mmap.mmap(fh.fileno(), min(CHUNK, size - start), access=mmap.ACCESS_READ, offset=start) as window:
                window.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(window) as block:
                    digest.update(block)
    return digest.hexdigest()


def _identity(path: Path) -> tuple[int, ...]:
    """What makes two asks for a file the same computation: the same file, unchanged since."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _failed(error: BaseException) -> Future[str]:
    future: Future[str] = Future()
    future.set_exception(error)
    return future


def sha256_later(paths: Iterable[Path]) -> dict[Path, Future[str]]:
    """Each file's sha256 as a future, hashed in the order asked (one thread: the command keeps the other core).

    A file that cannot be read gives a future holding the OSError, raised where the result is taken."""
    global _pool
    out: dict[Path, Future[str]] = {}
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="swtool-sha256")
        for path in paths:
            try:
                key = _identity(path)
            except OSError as exc:
                out[path] = _failed(exc)
                continue
            job = _jobs.get(key)
            if job is None or job.cancelled() or (job.done() and job.exception() is not None):
                job = _jobs[key] = _pool.submit(sha256_file, path, _generation)
            out[path] = job
    return out


def stop() -> None:
    """Give up every digest not yet complete (the command that wanted them has ended without writing):
    queued files are not read, the file being hashed stops at its next chunk."""
    global _generation
    with _lock:
        _generation += 1
        for key, job in list(_jobs.items()):
            if not job.done():
                job.cancel()
                del _jobs[key]
