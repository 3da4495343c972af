"""Shared fixtures: the real model and text (fetched once into a cache), SmolLM2 as an HF directory.

Tests are grouped by concern, as the package is: architecture/, formats/, codecs/, model/,
analysis/, commands/, and real/ (SmolLM2 end to end). What several of them build or run
(tiny models, the test GGUF converter, damaged files, the CLI, llama.cpp) lives in
tests/helpers/, imported as `tests.helpers.*` (tests/ is a package; pyproject's
`pythonpath = ["."]` puts the repository root on sys.path); no test imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SWTOOL_SLOW"):
        for item in items:
            item.own_markers = [m for m in item.own_markers if m.name != "slow"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tests.helpers.fetch import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def wiki_text() -> str:
    from tests.helpers.fetch import wiki_text

    return wiki_text()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 as an HF directory in fp16, made by swtool's own export from the GGUF."""
    import torch

    from swtool.formats.hf.export import export_hf
    from swtool.formats.open import open_checkpoint

    out = tmp_path_factory.mktemp("smollm2-hf")
    export_hf(open_checkpoint(smollm2_gguf), out, torch.float16)
    return out
