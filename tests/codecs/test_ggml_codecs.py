"""swtool's GGML codecs write exactly the bytes gguf-py's reference quantizer writes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from swtool.codecs.ggml import TYPES, NonFiniteError, can_encode, encode, encoded_nbytes
from tests.helpers.ggml_reference import edge_cases, reference

ALL = sorted(TYPES)


def assert_identical(data: np.ndarray, name: str, threads: int | None = None) -> None:
    ours = encode(data, TYPES[name], threads=threads)
    ref = reference(data, name)
    assert ours.dtype == np.uint8 and ours.shape[:-1] == data.shape[:-1]
    assert ours.nbytes == encoded_nbytes(data.shape, TYPES[name]) == len(ref)
    if ours.tobytes() != ref:
        rows = np.nonzero((ours.reshape(-1) != np.frombuffer(ref, np.uint8)).reshape(ours.shape[:-1] + (-1,)).any(-1))
        pytest.fail(f"{name}: bytes differ from gguf-py in rows {rows[0][:10].tolist()}")


@pytest.mark.parametrize("name", ALL)
def test_random_data_matches_gguf_py(name):
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 30.0):
        assert_identical((rng.standard_normal((37, 256)) * scale).astype(np.float32), name)


@pytest.mark.parametrize("name", ALL)
def test_edge_cases_match_gguf_py(name):
    assert_identical(edge_cases(), name)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1"])
def test_threads_and_chunks_do_not_change_bytes(name, monkeypatch):
    import swtool.codecs.ggml as ggml

    data = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", 1000)  # many uneven chunks
    monkeypatch.setattr(ggml, "NATIVE_CHUNK_ELEMENTS", 1000)
    assert_identical(data, name, threads=3)
    assert_identical(data, name, threads=1)


def test_torch_and_low_precision_inputs():
    data = torch.randn(8, 64, dtype=torch.bfloat16)
    assert encode(data, TYPES["Q4_0"]).tobytes() == reference(data.float().numpy(), "Q4_0")
    three_d = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    assert encode(three_d, TYPES["Q8_0"]).shape == (2, 3, 68)
    assert_identical(three_d, "Q5_0")


@pytest.mark.parametrize("name", ALL)
def test_non_finite_values_are_refused(name):
    for bad in (np.nan, np.inf, -np.inf):
        data = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
        data[2, 40] = bad
        with pytest.raises(NonFiniteError):
            encode(data, TYPES[name])


def test_rows_that_do_not_fill_blocks_are_refused():
    assert not can_encode((4, 100), TYPES["Q4_0"])
    assert can_encode((4, 100), TYPES["F16"])
    with pytest.raises(ValueError, match="not a multiple"):
        encode(np.zeros((4, 100), np.float32), TYPES["Q4_0"])


@pytest.mark.parametrize("tensor", ["blk.11.ffn_down.weight", "blk.0.attn_q.weight", "blk.29.ffn_gate.weight"])
def test_real_smollm2_tensors_match_gguf_py(smollm2_gguf, tensor):
    """Real weights, dequantized from the Q4_1 file (full of repeated values, ties and signed zeros)."""
    reader = gguf.GGUFReader(smollm2_gguf)
    info = next(t for t in reader.tensors if t.name == tensor)
    values = gguf.quants.dequantize(np.asarray(info.data), info.tensor_type).astype(np.float32)
    for name in ALL:
        assert_identical(values, name)
