"""The real model and English text for tests, from fixtures/fetch.py.

fixtures/fetch.py stays a script at the repository root (scripts/demo and the README run
`python fixtures/fetch.py smollm2`), so it is loaded here by its path: tests need no
sys.path entry for it, and the repository does not claim the top-level name `fixtures`
(a PyPI library's) as a package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "fixtures" / "fetch.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("swtool_fixtures_fetch", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fetch = _load()
smollm2_gguf = _fetch.smollm2_gguf
wiki_text = _fetch.wiki_text
