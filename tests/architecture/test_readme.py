"""The README renders as written: every code fence that opens also closes."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_code_fences_balance():
    open_at = None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if not fence:
            continue
        if open_at is None:
            open_at = number
        else:
            assert not fence.group(1), f"README.md:{number}: a fence opens ({line.strip()}) inside the block opened at line {open_at}"
            open_at = None
    assert open_at is None, f"README.md:{open_at}: a code block is never closed"


def test_no_heading_inside_a_code_block():
    inside = False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        assert not (inside and line.startswith("## ")), f"README.md:{number}: a section heading inside a code block"
