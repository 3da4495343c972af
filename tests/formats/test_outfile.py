"""OutputFile: the bytes on disk are exactly those written, with O_DIRECT, without it, and when it fails late."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import numpy as np
import pytest

from swtool.formats import outfile
from swtool.formats.outfile import OutputFile

STAGE = 64 << 10


@pytest.fixture(autouse=True)
def small_stages(monkeypatch):
    monkeypatch.setattr(outfile, "STAGE_BYTES", STAGE)


def pieces(seed: int) -> list[bytes]:
    """Writes of awkward sizes: empty, tiny, unaligned, exactly a stage, several stages at once."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 8, 4095, 4096, STAGE, 3 * STAGE + 17, 123, STAGE - 5, 0, 70_001]
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


def direct_io_works(directory) -> bool:
    """Whether this file system takes an aligned O_DIRECT write (tmpfs before Linux 6.6 does not)."""
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, 4096), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("count", [0, 1, 3, 11])
def test_the_file_holds_exactly_what_was_written(tmp_path, count):
    data = pieces(count)[:count]
    with OutputFile(tmp_path / "out") as out:
        for piece in data:
            out.write(piece)
        assert out.tell() == sum(map(len, data))
    assert (tmp_path / "out").read_bytes() == b"".join(data)


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path):
    out = OutputFile(tmp_path / "out")
    try:
        assert out._direct == direct_io_works(tmp_path)
    finally:
        out.close()


def test_without_o_direct_the_bytes_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(outfile, "O_DIRECT", 0)
    data = pieces(5)
    with OutputFile(tmp_path / "out") as out:
        assert not out._direct
        for piece in data:
            out.write(piece)
    assert (tmp_path / "out").read_bytes() == b"".join(data)


def test_a_file_system_refusing_direct_writes_late_gets_buffered_ones(tmp_path, monkeypatch):
    """Some file systems accept the flag, then answer EINVAL to the writes themselves."""
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    if not direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT when it is set: the late refusal cannot happen")
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = pieces(7)
    with OutputFile(tmp_path / "out") as out:
        for piece in data:
            out.write(piece)
    assert (tmp_path / "out").read_bytes() == b"".join(data)
    assert refused == [0]  # refused once, then never asked again


def test_a_write_error_surfaces_and_an_error_inside_leaves_no_thread(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        with OutputFile(tmp_path / "out") as out:
            for piece in pieces(3):
                out.write(piece)
    assert out._fd == -1 and out._writer._shutdown
