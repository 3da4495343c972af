"""The real consumer: stock llama.cpp loads swtool's GGUF files of SmolLM2 and gives a sensible perplexity.

Skipped unless SWTOOL_LLAMA_CPP names the folder holding llama-perplexity.
The original Q4_1 file scores about 16.6 on this text (zeroing the super
weight takes it to about 125); a broken tokenizer, permutation or tensor type
gives hundreds or thousands, or a load failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from swtool.formats.base import Held
from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.open import open_checkpoint
from tests.helpers.llamacpp import SKIP_REASON, configured, final_perplexity

pytestmark = [pytest.mark.llamacpp, pytest.mark.skipif(configured() is None, reason=SKIP_REASON)]
SUPER = Held("model.layers.11.mlp.down_proj.weight", 507, 1229)
CHUNKS = 6


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, wiki_text) -> Path:
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(wiki_text[:60_000])
    return path


def perplexity(model: Path, text: Path) -> float:
    return final_perplexity(model, text, CHUNKS)


@pytest.mark.parametrize(
    "type_name, options",
    [("Q8_0", {}), ("Q4_0", {}), ("Q4_0", {"super_weights": [SUPER], "keep_super": True})],
    ids=["Q8_0", "Q4_0", "Q4_0-keep-super"],
)
def test_llama_perplexity_runs_swtool_files(smollm2_gguf, text_file, tmp_path, type_name, options):
    checkpoint = open_checkpoint(smollm2_gguf)
    out = tmp_path / f"{type_name}.gguf"
    save_gguf(checkpoint, plan_gguf(checkpoint, type_name, **options), out)
    assert 8 < perplexity(out, text_file) < 30


def test_llama_perplexity_runs_a_file_built_from_an_hf_directory(smollm2_hf, text_file, tmp_path):
    """Hyper-parameters, Q/K permutation and tokenizer.ggml.* all rebuilt from config.json and tokenizer.json."""
    checkpoint = open_checkpoint(smollm2_hf)
    out = tmp_path / "from-hf.gguf"
    save_gguf(checkpoint, plan_gguf(checkpoint, "Q8_0"), out)
    assert 8 < perplexity(out, text_file) < 30
