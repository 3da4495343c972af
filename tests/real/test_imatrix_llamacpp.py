"""`swtool imatrix` and llama-imatrix on SmolLM2 and the same text agree; llama-quantize takes swtool's file.

Skipped unless SWTOOL_LLAMA_CPP names the folder of llama.cpp's binaries. Two comparisons:
on the Q4_1 file as it is, llama.cpp multiplies by activations rounded to 8 bits (Q8_1) and keeps
a float16 KV cache, so columns differ by about 0.25% (median; up to a few % on attention outputs);
on the same weights stored as F32 with a float32 KV cache, the only difference left is the order of
float32 arithmetic (measured: median 5e-7, worst column 3e-5, relative).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from swtool.formats.open import open_checkpoint
from swtool.formats.gguf.imatrix import read_imatrix
from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.imatrix import imatrix

BIN = os.environ.get("SWTOOL_LLAMA_CPP")
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(not BIN, reason="SWTOOL_LLAMA_CPP is not set (the llama.cpp build/bin folder with llama-imatrix and llama-quantize)"),
]
CHUNKS = 4


def llama(tool: str, *args: object, cwd: Path) -> str:
    run = subprocess.run([str(Path(BIN) / tool), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "LD_LIBRARY_PATH": str(BIN)})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory, smollm2_gguf, wiki_text) -> Path:
    folder = tmp_path_factory.mktemp("imatrix")
    (folder / "wiki.txt").write_text(wiki_text[:60_000])
    save_gguf(open_checkpoint(smollm2_gguf), plan_gguf(open_checkpoint(smollm2_gguf), "F32"), folder / "f32.gguf")
    imatrix(open_checkpoint(smollm2_gguf), Path(folder / "wiki.txt"), folder / "swtool.gguf", ctx=512, chunks=CHUNKS)
    return folder


def relative_errors(ours, theirs) -> dict[str, np.ndarray]:
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (CHUNKS, 512)
    out = {}
    for name, want in theirs.entries.items():
        got = ours.entries[name]
        np.testing.assert_array_equal(got.counts, want.counts, err_msg=name)
        out[name] = np.abs(got.in_sum2 - want.in_sum2) / np.abs(want.in_sum2)
    return out


def test_agrees_with_llama_imatrix_on_the_q4_1_file(work, smollm2_gguf):
    llama("llama-imatrix", "-m", smollm2_gguf, "-f", work / "wiki.txt", "-c", 512, "--chunks", CHUNKS, "-t", 2, "--no-ppl", "-o", "q4.gguf", cwd=work)
    errors = relative_errors(read_imatrix(work / "swtool.gguf"), read_imatrix(work / "q4.gguf"))
    assert len(errors) == 30 * 7
    medians = {name: float(np.median(e)) for name, e in errors.items()}
    assert np.median(list(medians.values())) < 0.005
    assert max(medians.values()) < 0.03


def test_agrees_with_llama_imatrix_to_float32_rounding_on_float32_weights(work):
    llama("llama-imatrix", "-m", "f32.gguf", "-f", work / "wiki.txt", "-c", 512, "--chunks", CHUNKS, "-t", 2, "--no-ppl",
          "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-o", "f32-imatrix.gguf", cwd=work)
    errors = relative_errors(read_imatrix(work / "swtool.gguf"), read_imatrix(work / "f32-imatrix.gguf"))
    assert np.median(np.concatenate([e.ravel() for e in errors.values()])) < 2e-6
    assert max(float(e.max()) for e in errors.values()) < 2e-4


def test_llama_quantize_takes_swtools_file(work):
    log = llama("llama-quantize", "--imatrix", "swtool.gguf", "f32.gguf", "q4_k.gguf", "Q4_K_S", 2, cwd=work)
    assert "loaded 210 importance matrix entries from swtool.gguf computed on 4 chunks" in log
    missing = [line for line in log.splitlines() if "did not find weights for" in line]
    assert [line.split()[-1] for line in missing] == ["token_embd.weight"]  # the tied embedding, which llama-imatrix skips too
