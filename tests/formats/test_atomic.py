"""Outputs appear whole or not at all: signals, crashes, full disks and racing writers.

Real processes (tests/helpers/slow_writer.py, writing through atomic_output and the
CLI's error handling) are interrupted while their output is half written; the
output's folder must afterwards look exactly as it did before.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output
from tests.helpers.clirun import SLOW_WRITER

WRITER = SLOW_WRITER


def start(target: Path, mode: str = "dir", seconds: float = 30, **kwargs) -> subprocess.Popen:
    """A slow writer that has written part of its output (it said "ready")."""
    process = subprocess.Popen([*WRITER, str(target), mode, str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    assert process.stdout.readline().strip() == "ready", process.communicate()
    return process


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("mode", ["dir", "file"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_writing_leaves_nothing(tmp_path, mode, sig):
    (tmp_path / "unrelated").write_text("stays")
    before = listing(tmp_path)
    target = tmp_path / "OUT"
    writer = start(target, mode)
    assert any(".swtool-tmp-" in name for name in listing(tmp_path))  # it was mid-write
    writer.send_signal(sig)
    status, stderr = finish(writer)
    assert status == 128 + sig
    assert stderr.strip() == f"swtool: error: interrupted by {sig.name}; {target} was not written"
    assert listing(tmp_path) == before


def test_second_writer_to_the_same_output_refuses(tmp_path):
    target = tmp_path / "OUT"
    first = start(target)
    second = subprocess.run([*WRITER, str(target), "dir", "0"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert second.stderr.strip() == f"swtool: error: {target}: another swtool process is writing it (lock {tmp_path}/.OUT.swtool-lock)"
    assert second.stdout == ""
    assert any(".swtool-tmp-" in name for name in listing(tmp_path))  # the refusal left the first writer's work alone
    first.terminate()
    assert finish(first)[0] == 128 + signal.SIGTERM
    assert listing(tmp_path) == []


def test_an_output_finished_while_waiting_for_the_lock_is_not_overwritten(tmp_path, monkeypatch):
    """Both runs saw no OUT; the first finished it before the second took the lock: the second must refuse."""
    from swtool.formats import atomic

    target = tmp_path / "OUT"
    real_lock = atomic._lock

    def lock_after_another_run(lock, tgt):
        target.mkdir()
        (target / "first").write_text("first")
        return real_lock(lock, tgt)

    monkeypatch.setattr(atomic, "_lock", lock_after_another_run)
    with pytest.raises(SwtoolError, match="already exists"):
        with atomic_output(target, directory=True) as temp:
            (temp / "second").write_text("second")
    assert listing(target) == ["first"]
    assert listing(tmp_path) == ["OUT"]


def test_writers_to_different_outputs_run_side_by_side(tmp_path):
    writers = [start(tmp_path / f"OUT{i}", seconds=0.5) for i in range(3)]
    assert [finish(w) for w in writers] == [(0, "")] * 3
    assert listing(tmp_path) == ["OUT0", "OUT1", "OUT2"]


def test_a_killed_writer_blocks_nobody_and_its_leftovers_go(tmp_path):
    """SIGKILL cannot be caught: the temp and lock stay, but the kernel drops the flock and the next writer cleans up."""
    target = tmp_path / "OUT"
    writer = start(target)
    writer.kill()
    writer.communicate()
    assert any(".swtool-tmp-" in name for name in listing(tmp_path))
    with atomic_output(target, directory=True) as temp:
        (temp / "f").write_text("new")
    assert listing(tmp_path) == ["OUT"]
    assert (target / "f").read_text() == "new"


def test_failure_in_the_body_removes_the_temporary(tmp_path):
    target = tmp_path / "OUT"
    with pytest.raises(ValueError):
        with atomic_output(target, directory=True) as temp:
            (temp / "half").write_bytes(b"x" * 100)
            raise ValueError("a bug")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_is_a_user_error_and_leaves_nothing(tmp_path, code, words):
    target = tmp_path / "OUT.gguf"
    with pytest.raises(SwtoolError, match=f"{target}: {words} while writing; {target} was not written"):
        with atomic_output(target, directory=False) as temp:
            temp.write_bytes(b"x" * 100)
            raise OSError(code, os.strerror(code))
    assert listing(tmp_path) == []


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_real_write_failure_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write (EFBIG) the way a full disk fails it (ENOSPC)."""
    target = tmp_path / "OUT"
    done = subprocess.run(
        [*WRITER, str(target), "dir", "0", str(1 << 20)], capture_output=True, text=True, timeout=60, preexec_fn=_limit_file_size
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"swtool: error: {target}: file too large while writing; {target} was not written"
    assert listing(tmp_path) == []


def test_a_full_tmpfs(tmp_path):
    """A real full filesystem, where this machine lets us mount one (root); skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        target = mount / "OUT"
        done = subprocess.run([*WRITER, str(target), "dir", "0", str(1 << 20)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"swtool: error: {target}: no space left on device while writing; {target} was not written"
        assert listing(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_refuses_to_write_into_or_over_the_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for target in (model, model / "sub", tmp_path):
        with pytest.raises(SwtoolError, match="refusing to write over or into the input"):
            with atomic_output(target, directory=True, inputs=[model], force=True):
                pass
    assert listing(model) == ["config.json"]
    assert listing(tmp_path) == ["model"]


def test_existing_output_needs_force_and_is_then_replaced_whole(tmp_path):
    target = tmp_path / "OUT"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(SwtoolError, match="already exists \\(use --force to replace it\\)"):
        with atomic_output(target, directory=True):
            pass
    assert listing(target) == ["old"]
    with atomic_output(target, directory=True, force=True) as temp:
        (temp / "new").write_text("new")
    assert listing(target) == ["new"]
    assert listing(tmp_path) == ["OUT"]


def test_works_off_the_main_thread(tmp_path):
    """Signal handlers can only be set in the main thread; writing from another thread must still work."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with atomic_output(tmp_path / "OUT", directory=False) as temp:
                temp.write_text("ok")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []
    assert (tmp_path / "OUT").read_text() == "ok"


def test_signal_handlers_are_restored(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with atomic_output(tmp_path / "OUT", directory=False) as temp:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        temp.write_text("ok")
    assert {sig: signal.getsignal(sig) for sig in before} == before
