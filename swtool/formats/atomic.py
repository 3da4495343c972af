"""Outputs that appear whole or not at all.

Every command that writes builds its output in a temporary sibling of the
target (same filesystem, so the final rename is atomic), holds a lock next to
the target so a second process aiming at the same output refuses, and removes
both on any failure, including SIGINT, SIGTERM and a full disk.

The lock is an flock(2) on `.NAME.swtool-lock`: the kernel drops it when its
holder dies, even by SIGKILL, so a crashed run never blocks the next one, and
the next writer to the same target removes the temporary sibling the dead one
left (`.NAME.swtool-tmp-PID`). Signals are deferred while the finished output
is moved into place and while a failed one is removed, so neither step is cut
in half.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from swtool.errors import SwtoolError

SIGNALS = (signal.SIGINT, signal.SIGTERM)

DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
}
"""Write failures that are the machine's state, not a bug: reported as one line (exit 2), not as an internal error."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while an output was being written.

    A KeyboardInterrupt, not a SwtoolError, so that no `except Exception` (and no
    loop that skips past bad models) can swallow it; `status` is the shell's 128 + signal.
    """

    def __init__(self, signum: int, outcome: str = ""):
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f"; {outcome}" if outcome else ""))
        self.signum = signum
        self.status = 128 + signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def check_target(target: Path, inputs: list[Path], force: bool) -> None:
    """Refuse to write into or over an input, or over an existing output without force."""
    resolved = target.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise SwtoolError(f"{target}: refusing to write over or into the input {source}")
    if target.exists() and not force:
        raise SwtoolError(f"{target}: already exists (use --force to replace it)")
    check_writable(target)


def check_writable(target: Path) -> None:
    """Refuse, before any work, an output whose directory cannot take a new file (read-only, not ours, not a directory).

    Missing parents are fine (they are created): the nearest existing ancestor is probed by
    creating and removing an empty file in it, which is what writing will need.
    """
    parent = target.parent if str(target.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".{target.name}.swtool-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except FileExistsError:
        pass
    except OSError as exc:
        reason = DISK_ERRORS.get(exc.errno, exc.strerror or exc.__class__.__name__)
        raise SwtoolError(f"{target}: cannot write here ({reason}: {existing})") from None


def _lock(lock: Path, target: Path) -> int:
    """Hold an exclusive flock on `lock`; refuse if a live process holds it."""
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SwtoolError(f"{target}: another swtool process is writing it (lock {lock})") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked while we opened it
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Temporary siblings of `name` left by writers that died without cleaning up (we hold the lock now)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.swtool-tmp-\d+")
    for entry in parent.iterdir():
        if pattern.fullmatch(entry.name):
            _remove(entry)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (they are then delivered as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into Interrupted for the block (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def atomic_output(target: Path, *, directory: bool, inputs: list[Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success move it to `target`, on any failure remove it."""
    target = Path(target)
    check_target(target, list(inputs), force)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SwtoolError(f"{target}: cannot create its directory ({DISK_ERRORS.get(exc.errno, exc.strerror)})") from None
    lock = parent / f".{target.name}.swtool-lock"
    temp = parent / f".{target.name}.swtool-tmp-{os.getpid()}"
    with _signals_raise():
        fd, committed = None, False
        try:
            with _signals_deferred():
                fd = _lock(lock, target)
                check_target(target, list(inputs), force)  # again, under the lock: another run may have just finished it
                _remove_leftovers(parent, target.name)
                if directory:
                    temp.mkdir()
                else:
                    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            yield temp
            with _signals_deferred():
                if target.exists():
                    _remove(target)
                os.replace(temp, target)
                committed = True
        except BaseException as exc:
            if committed:  # a signal held back while the output was moved into place: the output is whole
                raise
            with _signals_deferred():
                _remove(temp)
            if isinstance(exc, Interrupted):
                raise Interrupted(exc.signum, f"{target} was not written") from None
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS and fd is not None:
                raise SwtoolError(f"{target}: {DISK_ERRORS[exc.errno]} while writing; {target} was not written") from None
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:  # the lock or the temporary could not be made
                raise SwtoolError(f"{target}: cannot write here ({DISK_ERRORS[exc.errno]})") from None
            raise
        finally:
            if fd is not None:
                with _signals_deferred():
                    lock.unlink(missing_ok=True)
                    os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
