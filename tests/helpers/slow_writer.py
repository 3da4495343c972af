"""A command that writes slowly through atomic_output, for tests that interrupt or race it.

    python tests/helpers/slow_writer.py TARGET (dir|file) SECONDS [BYTES]

Prints "ready" on stdout once the temporary output holds data, then keeps
writing for SECONDS; errors go through the CLI's `guarded`, as in real commands.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from swtool.cli import guarded
from swtool.formats.atomic import atomic_output

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def write(target: Path, mode: str, seconds: float, size: int = typer.Argument(4096)) -> None:
    def run() -> int:
        with atomic_output(target, directory=mode == "dir") as temp:
            path = temp / "model.safetensors" if mode == "dir" else temp
            with path.open("wb") as fh:
                fh.write(b"x" * size)
                fh.flush()
                print("ready", flush=True)
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    fh.write(b"y" * 64)
                    time.sleep(0.01)
        return 0

    guarded(run)


if __name__ == "__main__":
    sys.exit(app())
