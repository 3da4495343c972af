"""Running swtool as a user would, and checking that it failed the way a Unix tool should.

`invoke` runs the CLI in-process (fast: torch is already imported); `swtool`
runs the real console script in a subprocess, for what only a real process
shows (signals, exit status, a shell pipeline, stray tracebacks).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from swtool.cli import app

HELPERS = Path(__file__).resolve().parent
SLOW_COMMAND = [sys.executable, str(HELPERS / "slow_command.py")]
"""A real swtool command whose writer pauses after its first tensor (see slow_command.py)."""
SLOW_WRITER = [sys.executable, str(HELPERS / "slow_writer.py")]
"""A command writing slowly through atomic_output (see slow_writer.py)."""

SCRIPT = Path(sys.executable).with_name("swtool")
SWTOOL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "swtool.cli"]
"""The installed console script, as users run it (the module where it is not installed)."""


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def swtool(*args: object, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run([*SWTOOL, *map(str, args)], **kwargs)


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `command` in bash with swtool on PATH, as a user's script would."""
    env = {**os.environ, "PATH": f"{Path(SWTOOL[0]).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_user_error(result, match: str, stdout: str = "") -> str:
    """Exit 2, exactly one line on stderr saying `swtool: error: ...` matching `match`, no traceback."""
    status = getattr(result, "exit_code", getattr(result, "returncode", None))
    stderr = result.stderr
    assert status == 2, f"exit {status}, stderr: {stderr!r}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("swtool: error: "), lines[0]
    assert "Traceback" not in stderr
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    assert result.stdout == stdout
    return lines[0]


def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under `paths` (and their parents' listings) with its sha256: nothing may change or appear."""
    state: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        for parent in {root.parent, root} if root.is_dir() else {root.parent}:
            state[f"ls {parent}"] = " ".join(sorted(os.listdir(parent)))
        for file in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if file.is_file():
                state[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return state
