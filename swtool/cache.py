"""Where swtool keeps what it makes once and reuses across runs (compiled kernels, remembered digests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """swtool/ under $SWTOOL_CACHE, else $XDG_CACHE_HOME, else ~/.cache (not created here)."""
    base = os.environ.get("SWTOOL_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swtool"
