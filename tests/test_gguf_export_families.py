"""`swtool dequantize model.gguf -o DIR` for every family: transformers loads DIR and computes the model
swtool computes from the GGUF (and the HF model the GGUF was converted from)."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import invoke
from gguf_tiny import convert
from test_gguf_families import CASES, logits
from tiny import build

from swtool.families.config import ModelConfig
from swtool.families.rope import llama3_rope_factors
from swtool.formats.hf.export import llama3_scaling
from swtool.formats.open import open_checkpoint

CLASSES = {
    "llama": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
}


def transformers_logits(directory, tokens: torch.Tensor):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(tokens).logits


@pytest.mark.parametrize("case", list(CASES))
def test_dequantized_gguf_is_the_same_model_for_transformers(tmp_path, case):
    """The GGUF comes from the test converter (llama.cpp's conventions, not swtool's writer); 16 tokens,
    longer than the sliding windows of the Gemma models."""
    build(case.removesuffix("-tied"), tmp_path / "hf", **CASES[case])
    convert(tmp_path / "hf", tmp_path / "m.gguf")
    result = invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    ours = logits(open_checkpoint(tmp_path / "m.gguf"), tokens)
    name, theirs = transformers_logits(tmp_path / "out", tokens)
    assert name == CLASSES[case]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * scale)
    _, original = transformers_logits(tmp_path / "hf", tokens)
    torch.testing.assert_close(theirs, original, rtol=0, atol=1e-4 * scale)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 4


def test_llama3_rope_freqs_become_rope_scaling_again(tmp_path):
    """llama.cpp keeps llama3 RoPE scaling only as the rope_freqs tensor; the exported config reproduces its frequencies."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    build("llama", tmp_path / "hf", rope_parameters=rope, rope_scaling=rope)
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    gg = open_checkpoint(tmp_path / "m.gguf")
    assert gg.has("rope_freqs.weight") and gg.config.rope_scaling is None
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert "rope_freqs.weight" not in open_checkpoint(tmp_path / "out").names()
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    _, theirs = transformers_logits(tmp_path / "out", tokens)
    ours = logits(gg, tokens)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * float(ours.abs().max()))


def llama_config(head_dim: int, theta: float, scaling: dict | None = None) -> ModelConfig:
    return ModelConfig("llama", 64, 128, 2, 4, 4, head_dim, 300, 1e-5, theta, rope_scaling=scaling)


@pytest.mark.parametrize("head_dim, theta, original", [(128, 500000.0, 8192), (64, 10000.0, 2048), (16, 10000.0, 32), (16, 10000.0, 8), (8, 10000.0, 16)])
def test_llama3_parameters_are_recovered_from_the_divisors(head_dim, theta, original):
    """Llama 3.1's shape gives back its own parameters; tiny shapes, with at most one divisor between the
    two regimes, give parameters whose divisors are the same (the parameters themselves are not determined)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    divisors = llama3_rope_factors(llama_config(head_dim, theta, scaling))
    recovered = llama3_scaling(divisors, llama_config(head_dim, theta))
    if head_dim >= 64:
        assert recovered == scaling
    torch.testing.assert_close(llama3_rope_factors(llama_config(head_dim, theta, recovered)), divisors, rtol=1e-5, atol=0)


def test_divisors_that_are_not_llama3_are_refused():
    from swtool.errors import SwtoolError

    divisors = torch.tensor([1.0, 3.0, 2.0, 8.0, 8.0, 8.0, 8.0, 8.0])  # not monotonic
    with pytest.raises(SwtoolError, match="does not follow llama3 RoPE scaling"):
        llama3_scaling(divisors, llama_config(16, 10000.0))
    assert llama3_scaling(torch.ones(8), llama_config(16, 10000.0)) is None  # all ones: no scaling at all


@pytest.mark.parametrize("style", ["prepend", "none"])
def test_a_sentencepiece_style_vocabulary_comes_back_as_the_same_tokenizer(style, wiki_text, tmp_path):
    """HF (byte-fallback BPE) -> GGUF `llama` vocabulary -> dequantized tokenizer.json: the same ids as the original."""
    from test_gguf_families_out import write_sentencepiece_tokenizer
    from tokenizers import Tokenizer

    build("llama", tmp_path / "hf", vocab_size=1024)
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, style)
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out").exit_code == 0
    sample = wiki_text[300_000:302_000] + " naïve 東京"
    original = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(sample).ids
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode(sample).ids == original


@pytest.mark.parametrize("case", ["llama-tied", "qwen2"])
def test_transformers_reading_the_gguf_agrees_with_the_dequantized_directory(case, tmp_path):
    """Where transformers' own GGUF loader handles the tiny shapes (Llama, Qwen2; its Qwen3, Phi-3 and Gemma-2/3
    loaders build other models from these files, see README) it gives the logits of the dequantized directory."""
    import transformers

    build(case.removesuffix("-tied"), tmp_path / "hf", **CASES[case])
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    _, from_dir = transformers_logits(tmp_path / "out", tokens)
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(tokens).logits, from_dir, rtol=1e-5, atol=1e-5)


def test_a_longrope_gguf_dequantizes_to_the_same_phi3(tmp_path):
    """rope_factors_long/short and the attn_factor key become the config's LongRoPE scaling again."""
    from test_gguf_families_out import OPTIONS

    build("phi3", tmp_path / "hf", **OPTIONS["phi3-longrope"])
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["long_factor"] == [1.0, 2.0, 3.5, 6.0]
    assert scaling["original_max_position_embeddings"] == 32 and scaling["factor"] == 8.0
    assert not any(name.startswith("rope_factors") for name in open_checkpoint(tmp_path / "out").names())
    for length in (20, 60):
        tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        _, theirs = transformers_logits(tmp_path / "out", tokens)
        _, original = transformers_logits(tmp_path / "hf", tokens)
        torch.testing.assert_close(theirs, original, rtol=0, atol=1e-4 * float(original.abs().max()))
