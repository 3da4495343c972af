"""Outputs that appear whole or not at all.

Every command that writes builds its output in a temporary sibling of the
target (same filesystem, so the final rename is atomic), holds a lock file
next to the target so a second process aiming at the same output refuses,
and removes both on any failure, including SIGINT and SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from swtool.errors import SwtoolError


class Interrupted(SwtoolError):
    """SIGINT or SIGTERM arrived while an output was being written."""


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}; nothing was written")


def check_target(target: Path, inputs: list[Path], force: bool) -> None:
    """Refuse to write into or over an input, or over an existing output without force."""
    resolved = target.resolve()
    for source in inputs:
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise SwtoolError(f"{target}: refusing to write over or into the input {source}")
    if target.exists() and not force:
        raise SwtoolError(f"{target}: already exists (use --force to replace it)")


@contextmanager
def atomic_output(target: Path, *, directory: bool, inputs: list[Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success move it to `target`, on any failure remove it."""
    target = Path(target)
    check_target(target, list(inputs), force)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    lock = parent / f".{target.name}.swtool-lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise SwtoolError(f"{target}: another swtool process is writing it (lock {lock})") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".swtool-tmp", dir=parent))
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".swtool-tmp", dir=parent)
        os.close(handle)
        temp = Path(name)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it private; the output is an ordinary file
    try:
        yield temp
        if target.exists():
            _remove(target)
        os.replace(temp, target)
    except BaseException:
        _remove(temp)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
