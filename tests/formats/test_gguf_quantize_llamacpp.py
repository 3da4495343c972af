"""`swtool quantize F16.gguf --type MIX` writes, tensor for tensor and byte for byte, what llama-quantize writes.

SmolLM2 is exported once to an F16 GGUF (swtool's own HF -> GGUF path); llama-quantize
and swtool then quantize that same file at every mix. Tensor names, types, shapes and
data must be identical (the order may differ: llama-quantize sorts them), and so must every key/value llama-quantize writes, except the
`swtool.*` provenance (llama-quantize copies the F16 file's, swtool writes its own).
llama-perplexity must load swtool's files and give llama-quantize's perplexity.
Skipped unless SWTOOL_LLAMA_CPP names llama.cpp's build/bin.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from swtool.formats.gguf.mixes import MIXES

BIN = os.environ.get("SWTOOL_LLAMA_CPP")
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.slow,
    pytest.mark.skipif(not BIN, reason="SWTOOL_LLAMA_CPP is not set (the llama.cpp build/bin folder with llama-quantize, llama-perplexity)"),
]
QUANTIZED_MIXES = [name for name, mix in MIXES.items() if mix.quantized]


def run(*command: str | Path) -> str:
    result = subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def swtool_quantize(source: Path, out: Path, mix: str, *extra: object) -> None:
    from tests.helpers.clirun import invoke

    result = invoke("quantize", source, "-o", out, "--type", mix, "--no-keep-super", "-q", *extra)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def f16(smollm2_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f16") / "smollm2-f16.gguf"
    swtool_quantize(smollm2_hf, out, "F16")
    return out


def contents(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "swtool."))}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def imatrix(smollm2_gguf, wiki_text, tmp_path_factory) -> Path:
    """An importance matrix of SmolLM2 on Wikipedia text, made by swtool imatrix (llama-quantize reads it as its own)."""
    from tests.helpers.clirun import invoke

    folder = tmp_path_factory.mktemp("imatrix")
    (folder / "wiki.txt").write_text(wiki_text[:40_000])
    result = invoke("imatrix", smollm2_gguf, "--text", folder / "wiki.txt", "-o", folder / "wiki.imatrix.gguf", "--ctx", "256", "--chunks", "4", "-q")
    assert result.exit_code == 0, result.output
    return folder / "wiki.imatrix.gguf"


@pytest.mark.parametrize("mix", QUANTIZED_MIXES)
def test_same_bytes_as_llama_quantize(f16, tmp_path, mix):
    assert_same_bytes(f16, tmp_path, mix)


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_same_bytes_as_llama_quantize_with_an_imatrix(f16, imatrix, tmp_path, mix):
    """--imatrix: the weighted quantizers and the mixes' imatrix rules give llama-quantize --imatrix's bytes."""
    assert_same_bytes(f16, tmp_path, mix, imatrix)


def assert_same_bytes(f16: Path, tmp_path: Path, mix: str, imatrix: Path | None = None) -> None:
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "swtool.gguf"
    run(Path(BIN) / "llama-quantize", *(["--imatrix", imatrix] if imatrix else []), f16, theirs, mix, "2")
    swtool_quantize(f16, ours, mix, *(["--imatrix", imatrix] if imatrix else []))
    their_fields, their_tensors = contents(theirs)
    our_fields, our_tensors = contents(ours)
    assert sorted(our_tensors) == sorted(their_tensors)  # llama-quantize writes them sorted by layer, swtool in input order
    for key, value in their_fields.items():
        if key.startswith("quantize.imatrix."):  # llama-quantize records the imatrix file it was given; swtool's provenance does
            continue
        assert our_fields.get(key) == value, key
    assert our_fields["general.file_type"] == int(MIXES[mix].file_type)
    for name, their in their_tensors.items():
        our = our_tensors[name]
        assert (our.tensor_type, list(our.shape)) == (their.tensor_type, list(their.shape)), name
        assert np.array_equal(np.asarray(our.data).view(np.uint8), np.asarray(their.data).view(np.uint8)), f"{name} ({their.tensor_type.name})"


def perplexity(model: Path, text: Path) -> float:
    output = run(Path(BIN) / "llama-perplexity", "-m", model, "-f", text, "-c", "128", "--chunks", "4", "-t", "2", "-b", "128")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    assert found, output[-2000:]
    return float(found.group(1))


def test_llama_perplexity_runs_swtool_files(smollm2_hf, f16, wiki_text, tmp_path):
    """Straight from the HF directory (one pass, no F16 file) and through the F16 file: the same perplexity as llama-quantize's."""
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text[:20_000])
    direct, theirs = tmp_path / "direct.gguf", tmp_path / "theirs.gguf"
    swtool_quantize(smollm2_hf, direct, "Q4_K_M")
    run(Path(BIN) / "llama-quantize", f16, theirs, "Q4_K_M", "2")
    ours, reference = perplexity(direct, text), perplexity(theirs, text)
    assert 1.0 < ours < 100.0 and ours == reference
