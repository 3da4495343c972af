"""sha256 of input files, hashed on one background thread, each file once per process.

Why: every output records the sha256 of the files it was made from (see swtool.provenance),
and hashing a model is a full pass over its bytes, about a second of CPU per 1.5 GB. Done up
front it made `swtool quantize` read the model twice and wait. Here a command asks for a
file's digest as soon as it knows the file (swtool.cli.start asks for the weight files before
it imports torch, so the second core hashes while the first imports) and takes the result
only when it writes its metadata; asking again for an unchanged file reuses the same
computation. Nothing here imports more than the standard library (and swtool.cache), so the command
line can start it first.

Digests are also remembered across runs (`$SWTOOL_CACHE`, `$XDG_CACHE_HOME` or `~/.cache`, under
swtool/sha256.json), keyed by what changes whenever a file's content can have changed: device,
inode, size, and modification and status-change times in nanoseconds (the status-change time
cannot be set back by any program). So quantizing one model at several types hashes it once.
A digest is only remembered if the file was last changed more than `SETTLED_S` before it was
hashed, so that a file rewritten within one tick of a coarse file-system clock is never
mistaken for the one hashed (git's "racily clean" rule), and only if the file is unchanged
after hashing. Remembering is best effort: an unreadable or unwritable cache just means hashing.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from swtool.cache import cache_root

CHUNK = 1 << 24
"""Bytes mapped and hashed at a time (a multiple of mmap.ALLOCATIONGRANULARITY): hashing can
stop between chunks, hashlib releases the GIL for each, and at most one chunk of the file is
in the process's resident set."""


SETTLED_S = 2.0
"""A file changed less than this long before it was hashed is not remembered (FAT's clock ticks in 2 s)."""

REMEMBERED = 4096
"""Digests kept in the cache file, the most recently hashed or used last."""


class Cancelled(Exception):
    """Hashing was stopped (`stop`) before this file's digest was complete."""


_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_jobs: dict[tuple[int, ...], Future[str]] = {}
"""This process's digests, asked for or computed, by file identity (`_identity`)."""
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


def cache_file() -> Path:
    return cache_root() / "sha256.json"


def _remembered() -> dict[str, str]:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64}


def _remember(key: str, digest: str) -> None:
    """Add one digest to the cache file, written whole to a temporary sibling and renamed (a reader
    never sees half a file; of two runs writing at once, the last one's entries stay)."""
    with _lock:
        entries = _remembered()
        entries.pop(key, None)
        entries[key] = digest
        kept = dict(list(entries.items())[-REMEMBERED:])
        target = cache_file()
        temporary: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".sha256-", delete=False) as out:
                temporary = out.name
                json.dump(kept, out)
            os.replace(temporary, target)
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)


def _key(identity: tuple[int, ...]) -> str:
    return ":".join(map(str, identity))


def _hash_and_remember(path: Path, identity: tuple[int, ...], generation: int) -> str:
    started = time.time_ns()
    digest = sha256_file(path, generation)
    changed = max(identity[3], identity[4])
    if started - changed > SETTLED_S * 1e9 and _identity(path) == identity:
        _remember(_key(identity), digest)
    return digest


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
        remembered: dict[str, str] | None = None
        for path in paths:
            try:
                identity = _identity(path)
            except OSError as exc:
                out[path] = _failed(exc)
                continue
            job = _jobs.get(identity)
            if job is None or job.cancelled() or (job.done() and job.exception() is not None):
                remembered = _remembered() if remembered is None else remembered
                if _key(identity) in remembered:
                    job = Future()
                    job.set_result(remembered[_key(identity)])
                else:
                    job = _pool.submit(_hash_and_remember, path, identity, _generation)
                _jobs[identity] = job
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
