"""The package's imports run one way: commands -> analysis -> model -> formats -> codecs.

Every `import` statement in swtool is read with `ast` (function-local ones too, so a
circle cannot hide behind a late import). Families/config are data any layer reads;
errors, workers, native, readahead, digests, cache and heap sit at the bottom and import nothing of ours
above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "swtool"

LAYERS = {
    "commands": 4,
    "analysis": 3,
    "model": 2,
    "formats": 1,
    "codecs": 0,
    "data": -1,
    "bottom": -2,
}
"""Higher imports lower, never the other way. `data` and `bottom` are importable from everywhere."""

PLACES = [
    ("swtool.cli", "commands"),
    ("swtool.quantize", "commands"),
    ("swtool.scan", "commands"),
    ("swtool.dequantize", "commands"),
    ("swtool.edit", "commands"),
    ("swtool.imatrix", "commands"),
    ("swtool.directory", "commands"),
    ("swtool.report", "commands"),
    ("swtool.plot", "commands"),
    ("swtool.provenance", "commands"),
    ("swtool.detect", "analysis"),
    ("swtool.importance", "analysis"),
    ("swtool.evaluate", "analysis"),
    ("swtool.supers", "analysis"),
    ("swtool.ablation", "analysis"),
    ("swtool.actquant", "analysis"),
    ("swtool.verify", "analysis"),
    ("swtool.input_sums", "analysis"),
    ("swtool.model", "model"),
    ("swtool.formats", "formats"),
    ("swtool.codecs", "codecs"),
    ("swtool.families", "data"),
    ("swtool.data", "data"),
    ("swtool.errors", "bottom"),
    ("swtool.workers", "bottom"),
    ("swtool.native", "bottom"),
    ("swtool.readahead", "bottom"),
    ("swtool.digests", "bottom"),
    ("swtool.cache", "bottom"),
    ("swtool.heap", "bottom"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    for prefix, layer in PLACES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def imports(path: Path) -> set[str]:
    """swtool modules imported anywhere in the file (`from swtool.x import y` counts y when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("swtool"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("swtool") and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file() or (PACKAGE.parent / candidate.replace(".", "/")).is_dir():
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # a package's __init__ is imported on the way to its modules; it is not an edge of meaning
        edges[name] = {m for m in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
    return edges


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in graph() if m != "swtool" and layer_of(m) is None)
    assert not unplaced, f"modules with no layer (add them to PLACES): {unplaced}"


def test_nothing_imports_upward():
    upward = []
    for module, targets in graph().items():
        if module == "swtool":
            continue
        mine = LAYERS[layer_of(module)]
        for target in targets:
            theirs = LAYERS[layer_of(target)]
            if theirs > mine and layer_of(target) not in ("data", "bottom"):
                upward.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
            if layer_of(module) in ("data", "bottom") and theirs > mine:
                upward.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("module", ["swtool.formats.gguf.reader", "swtool.formats.gguf.writer", "swtool.codecs.ggml"])
def test_format_modules_do_not_pull_in_the_model(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('swtool.model', 'swtool.detect', 'swtool.evaluate', 'swtool.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} imports {out}"
