"""swtool's GGML codecs write exactly the bytes gguf-py's reference quantizer writes."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch

from swtool.codecs.ggml import TYPES, NonFiniteError, can_encode, encode, encoded_nbytes

ALL = sorted(TYPES)


def reference(data: np.ndarray, name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gguf-py warns on fp16 overflow of huge scales
        return np.asarray(gguf.quants.quantize(data, TYPES[name])).tobytes()


def assert_identical(data: np.ndarray, name: str, threads: int | None = None) -> None:
    ours = encode(data, TYPES[name], threads=threads)
    ref = reference(data, name)
    assert ours.dtype == np.uint8 and ours.shape[:-1] == data.shape[:-1]
    assert ours.nbytes == encoded_nbytes(data.shape, TYPES[name]) == len(ref)
    if ours.tobytes() != ref:
        rows = np.nonzero((ours.reshape(-1) != np.frombuffer(ref, np.uint8)).reshape(ours.shape[:-1] + (-1,)).any(-1))
        pytest.fail(f"{name}: bytes differ from gguf-py in rows {rows[0][:10].tolist()}")


def edge_cases() -> np.ndarray:
    """One block-aligned matrix whose rows hit every special path of the codecs."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 64)).astype(np.float32)
    x[0] = 0.0                                   # all-zero blocks
    x[1] = -0.0                                  # negative zeros only
    x[2] = np.where(rng.random(64) < 0.5, -0.0, 0.0)
    x[3] = 1.5                                   # constant blocks
    x[4] = -3.0
    x[5] *= 1e-30                                # scales that underflow fp16
    x[6] *= 1e6                                  # scales that overflow fp16
    x[7] = 65504.0 * 2
    x[8, :32] = np.arange(32) - 16.5             # exact rounding ties
    x[8, 32:] = (np.arange(32) - 16) / 2
    x[9] = 2.0
    x[9, 7] = -2.0                               # +m/-m tie, positive first
    x[10] = 2.0
    x[10, 0] = -2.0                              # +m/-m tie, negative first
    x[11] = np.abs(x[11])
    x[11, 5:9] = 0.0
    x[11, 12] = -0.0                             # min is a zero of either sign
    x[12] = -np.abs(x[12])
    x[12, 5:9] = -0.0
    x[12, 12] = 0.0                              # max is a zero of either sign
    x[13] = np.float32(0.49999997)               # just below a rounding boundary
    x[14] = np.float32(1e-45)                    # subnormal
    for row in range(15, 48):                    # random mixes of few distinct values and signed zeros
        x[row] = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, 0.5, 2.0, -2.0], np.float32), size=64)
    return x


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
