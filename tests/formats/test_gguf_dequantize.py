"""GGUF -> Hugging Face directory: transformers gives the same logits from the directory as from the GGUF itself."""

from __future__ import annotations

import pytest
import torch

from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.hf.export import export_hf
from swtool.formats.open import open_checkpoint


def logits_both_ways(gguf_path, directory, ids):
    import transformers

    from_dir = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return from_dir(ids).logits, from_gguf(ids).logits


def test_tiny_quantized_gguf_dequantizes_to_the_same_model(tmp_path):
    from tests.helpers.tiny import build

    build("llama", tmp_path / "hf", tie_word_embeddings=True)
    checkpoint = open_checkpoint(tmp_path / "hf")
    save_gguf(checkpoint, plan_gguf(checkpoint, "Q4_1"), tmp_path / "q.gguf")
    (tmp_path / "out").mkdir()
    export_hf(open_checkpoint(tmp_path / "q.gguf"), tmp_path / "out", torch.float32)
    ours, theirs = logits_both_ways(tmp_path / "q.gguf", tmp_path / "out", torch.tensor([[3, 70, 140, 9, 255, 40, 41]]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_dequantizes_to_the_same_model(smollm2_gguf, tmp_path):
    """The real Q4_1 model: the directory swtool writes (fp32) and the GGUF give transformers the same logits."""
    import transformers

    out = tmp_path / "hf"
    out.mkdir()
    export_hf(open_checkpoint(smollm2_gguf), out, torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    ours, theirs = logits_both_ways(smollm2_gguf, out, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
