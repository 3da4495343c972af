"""The GGUF path: a tiny model converted as llama.cpp would reads back to the same numbers as its HF directory."""

from __future__ import annotations

import pytest
import torch
from gguf_tiny import convert
from tiny import build

from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream
from swtool.model.tokenizer import encode

# GGUF stores no query_pre_attn_scalar: llama.cpp scales Gemma queries by head_dim (by hidden/heads for the
# 27B models), so the Gemma models converted here use query_pre_attn_scalar = head_dim.
CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "gemma": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16},
    "mixtral": {},
}


def logits(checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    stream = LayerStream(checkpoint)
    h = stream.embed(tokens)
    for layer in stream.layers():
        h = stream.run_layer(layer, h)
    return stream.logits(h)


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_reads_like_the_hf_directory(tmp_path, case):
    family = case.removesuffix("-tied")
    hf_dir = tmp_path / "hf"
    build(family, hf_dir, **CASES[case])
    convert(hf_dir, tmp_path / "tiny.gguf")
    hf, gg = open_checkpoint(hf_dir), open_checkpoint(tmp_path / "tiny.gguf")
    assert gg.format == "gguf"
    wanted = [n for n in hf.names() if not (n == "lm_head.weight" and gg.config.tie_embeddings)]
    for name in wanted:
        assert gg.has(name), name
        torch.testing.assert_close(gg.load(name), hf.load(name), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert encode(gg, "Apple Inc. is a worldwide tech company.") == encode(hf, "Apple Inc. is a worldwide tech company.")
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    reference = logits(hf, tokens)
    torch.testing.assert_close(logits(gg, tokens), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_gguf_experts_are_reported_under_the_merged_tensor(tmp_path):
    build("mixtral", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "tiny.gguf")
    gg = open_checkpoint(tmp_path / "tiny.gguf")
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    assert gg.stored_name(name) == "blk.1.ffn_down_exps.weight"
    assert gg.shape(name) == (64, 128)
    assert torch.equal(gg.load(name, rows=[5]), gg.load(name)[5:6])


def chunk_perplexities(checkpoint, ids: list[int], n_ctx: int) -> list[float]:
    """Running perplexity after each chunk, as llama-perplexity prints it: second half of each chunk, no BOS."""
    stream = LayerStream(checkpoint)
    nll, count, out = 0.0, 0, []
    for c in range(len(ids) // n_ctx):
        chunk = torch.tensor([ids[c * n_ctx : (c + 1) * n_ctx]])
        h = stream.embed(chunk)
        for layer in stream.layers():
            h = stream.run_layer(layer, h)
        logp = torch.log_softmax(stream.logits(h)[0].double(), dim=-1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= float(logp[j, chunk[0, j + 1]])
            count += 1
        out.append(float(torch.tensor(nll / count).exp()))
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", ["llama", "olmo", "gemma2", "gemma3_text", "mixtral"])
def test_llama_cpp_runs_the_converted_gguf_as_swtool_does(tmp_path, case):
    """llama.cpp's own inference on the converted file gives swtool's perplexities: the conversion conventions
    the GGUF tests rely on (Q/K permutation, Gemma's 1 + w, merged experts, metadata) are llama.cpp's."""
    import os
    import re
    import subprocess
    from pathlib import Path

    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    if not folder:
        pytest.skip("set SWTOOL_LLAMA_CPP to the folder of llama.cpp's binaries (llama-perplexity)")
    build(case, tmp_path / "hf", **CASES[case])
    convert(tmp_path / "hf", tmp_path / "tiny.gguf")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    run = subprocess.run(
        [str(Path(folder) / "llama-perplexity"), "-m", str(tmp_path / "tiny.gguf"), "-f", str(text), "-c", "64", "-b", "64", "-t", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LD_LIBRARY_PATH": folder},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", run.stdout + run.stderr)]
    gg = open_checkpoint(tmp_path / "tiny.gguf")
    ours = chunk_perplexities(gg, encode(gg, text.read_text()), 64)
    assert len(ours) == len(theirs) >= 3
    assert ours == pytest.approx(theirs, rel=2e-3)


def test_a_planted_expert_super_weight_in_gguf_is_found_and_held_in_its_own_expert(tmp_path):
    """Scan of a GGUF Mixtral reports the merged tensor plus the expert; quantize's hold-out maps it back to that expert.

    A tiny random model's perplexity does not depend on the planted weight, so it is a
    candidate (not a verified super weight): its JSON entry goes through the hold-out's
    resolution as `--super FILE` would send it."""
    from swtool.detect import scan
    from swtool.supers import resolve
    from tiny import plant

    from swtool.detect import scan
    from swtool.supers import from_scan

    model = build("mixtral", tmp_path / "hf", seed=1)
    plant(model, tmp_path / "hf", [(1, 5, 17, 1)])  # expert 1 of this seed gets tokens on which channel 17 fires
    convert(tmp_path / "hf", tmp_path / "tiny.gguf")
    gg = open_checkpoint(tmp_path / "tiny.gguf")
    result = scan(gg)
    planted = [c for c in result.to_json()["candidates"] if (c["layer"], c["row"], c["col"]) == (1, 5, 17)]
    assert [(c["tensor"], c["expert"]) for c in planted] == [("blk.1.ffn_down_exps.weight", 1)]
    held = resolve(planted, gg, "scan")
    assert [(h.tensor, h.row, h.col) for h in held] == [("model.layers.1.block_sparse_moe.experts.1.w2.weight", 5, 17)]
