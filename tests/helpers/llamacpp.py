"""llama.cpp's binaries as the reference consumer: where they are, and what llama-perplexity says.

Tests that need them are marked `llamacpp` and skip, saying why, unless SWTOOL_LLAMA_CPP names
llama.cpp's build/bin folder.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ENV = "SWTOOL_LLAMA_CPP"
SKIP_REASON = f"{ENV} is not set (the llama.cpp build/bin folder with llama-perplexity)"

TEXT = "The quick brown fox jumps over the lazy dog. " * 6
"""What llama-perplexity and swtool both score on the tiny models (in 64-token chunks, byte by byte)."""


def configured() -> Path | None:
    """The folder SWTOOL_LLAMA_CPP names, or None."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def folder() -> Path:
    """The folder of llama.cpp's binaries; skips the calling test where SWTOOL_LLAMA_CPP is unset."""
    found = configured()
    if found is None:
        pytest.skip(SKIP_REASON)
    return found


def perplexity_output(model: Path, text: Path, ctx: int) -> str:
    """llama-perplexity's whole log (stdout and stderr) on `text`, in chunks and batches of `ctx` tokens, one thread."""
    bin_dir = folder()
    run = subprocess.run(
        [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout + run.stderr


def final_perplexity(model: Path, text: Path, chunks: int = 6) -> float:
    """llama-perplexity's final estimate over the first `chunks` 512-token chunks of `text`."""
    command = [str(folder() / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks), "-t", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    assert result.returncode == 0 and found, (result.stdout + result.stderr)[-3000:]
    return float(found.group(1))
