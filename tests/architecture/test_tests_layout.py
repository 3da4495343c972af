"""The tests keep the layout they were given: grouped by concern, shared code in tests/helpers, no path tricks.

Test modules sit in one directory per concern with no __init__.py, so pytest imports each by its bare
name: two with the same file name would collide. Shared builders are imported as `tests.helpers.*`
(pyproject's `pythonpath`), never by putting a folder on sys.path, and no test imports another test.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_test_module_is_in_a_concern_directory_with_a_unique_name():
    tests = [p for p in MODULES if p.name.startswith("test_")]
    assert len(tests) > 20
    assert [p for p in tests if p.parent == TESTS or p.parent.name == "helpers"] == []
    assert [name for name, n in Counter(p.name for p in tests).items() if n > 1] == []


def test_no_test_imports_a_test_module():
    found = {
        f"{path.relative_to(TESTS)}: {name}"
        for path in MODULES
        for name in imported_modules(path)
        if name.rsplit(".", 1)[-1].startswith("test_")
    }
    assert found == set()


def test_nothing_in_tests_edits_sys_path():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert found == []
