"""End to end: every K-quant and weighted legacy tensor llama-quantize writes for SmolLM2 is swtool's encode of the same input.

llama-quantize --allow-requantize reads the Q4_1 file, dequantizes each tensor to
float32 (ggml's reference decoder, equal to gguf-py's) and encodes it with the
type its mix picks, with or without an importance matrix made by llama-imatrix.
swtool's ggml.encode of gguf-py's dequantized source, with the imatrix entry
(sums / count, as llama-quantize's load_imatrix) as weights, must give the same
bytes for each tensor. Skipped unless SWTOOL_LLAMA_CPP names llama.cpp's build/bin.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader
from gguf.quants import dequantize

from swtool.codecs import ggml, kquants

BIN = os.environ.get("SWTOOL_LLAMA_CPP")
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(not BIN, reason="SWTOOL_LLAMA_CPP is not set (the llama.cpp build/bin folder with llama-quantize, llama-imatrix)"),
]


def run(*command: str | Path) -> None:
    result = subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def imatrix(smollm2_gguf, wiki_text, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imatrix")
    text = folder / "wiki.txt"
    text.write_text(wiki_text[:40_000])
    out = folder / "imatrix.gguf"
    run(Path(BIN) / "llama-imatrix", "-m", smollm2_gguf, "-f", text, "-c", "256", "--chunks", "3", "-t", "2", "-o", out)
    return out


def imatrix_weights(path: Path) -> dict[str, np.ndarray]:
    """tensor name -> per-column weights: in_sum2 / counts (GGUF imatrix), 1 where nothing was counted."""
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    weights = {}
    for name, tensor in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            sums = np.array(tensor.data, dtype=np.float32).reshape(-1)
            count = np.float32(np.array(tensors[f"{base}.counts"].data, dtype=np.float32).reshape(-1)[0])
            weights[base] = sums / count if count > 0 else np.ones_like(sums)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("mix,use_imatrix", [("Q4_K_M", False), ("Q4_K_M", True), ("Q3_K_M", True), ("Q2_K", False)])
def test_llama_quantize_bytes(smollm2_gguf, imatrix, tmp_path, mix, use_imatrix):
    out = tmp_path / f"{mix}.gguf"
    run(Path(BIN) / "llama-quantize", "--allow-requantize", *(["--imatrix", imatrix] if use_imatrix else []), smollm2_gguf, out, mix, "2")
    source = {t.name: t for t in GGUFReader(smollm2_gguf).tensors}
    weights = imatrix_weights(imatrix) if use_imatrix else {}
    compared: dict[str, int] = {}
    for tensor in GGUFReader(out).tensors:
        qtype = QType(tensor.tensor_type)
        if qtype not in kquants.TYPES and not (use_imatrix and qtype in kquants.WEIGHTED):
            continue
        original = source[tensor.name]
        values = dequantize(np.array(original.data), QType(original.tensor_type)).astype(np.float32)
        ours = ggml.encode(values.reshape(-1, values.shape[-1]), qtype, weights=weights.get(tensor.name))
        assert np.array_equal(ours.reshape(-1), np.array(tensor.data).reshape(-1)), f"{tensor.name} ({qtype.name}) differs from llama-quantize"
        compared[qtype.name] = compared.get(qtype.name, 0) + 1
    assert any(name.endswith("_K") for name in compared), compared  # the mix really produced K-quants here
    if use_imatrix:
        assert any(not name.endswith("_K") for name in compared), compared  # and weighted legacy fallbacks (576 columns)
