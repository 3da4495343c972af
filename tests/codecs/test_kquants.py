"""K-quant and weighted legacy codecs write llama.cpp's bytes; the K decoders read gguf-py's values.

The golden fixture (kquants_golden.npz, made by kquants_golden.py with llama.cpp's
own ggml_quantize_chunk) is compared with both engines: the C kernels and the
numpy fallback (native.kernels() patched to None). With SWTOOL_LLAMA_CPP set,
larger random inputs are also compared live with llama.cpp.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kquants_golden import FIXTURE, K_TYPES, LEGACY, WEIGHTED, ggml_quantize, load_ggml

from swtool import native
from swtool.codecs import ggml, kquants, kquants_numpy
from swtool.codecs.errors import NonFiniteError
from swtool.workers import parallel_chunks

GOLDEN = np.load(FIXTURE)
CASES = sorted({key.split("/")[0] for key in GOLDEN.files})
NATIVE = native.kernels() is not None
ENGINES = [pytest.param("c", marks=pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {native.status}")), "numpy"]
KNOWN = [(name, qtype, weighted) for name in CASES for qtype in WEIGHTED for weighted in (False, True) if f"{name}/{qtype.name}" + ("/w" if weighted else "") in GOLDEN.files]


@pytest.fixture
def engine(request, monkeypatch):
    """'c' runs the kernels as loaded; 'numpy' patches them away, as on a machine without a compiler."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "kernels", lambda: None)
    return request.param


def golden(name: str, qtype: QType, weighted: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    x = GOLDEN[f"{name}/x"]
    w = GOLDEN[f"{name}/w"] if weighted else None
    return x, w, GOLDEN[f"{name}/{qtype.name}" + ("/w" if weighted else "")]


def test_fixture_covers_every_type_both_ways():
    for qtype in K_TYPES:
        assert f"edges/{qtype.name}" in GOLDEN.files and f"edges/{qtype.name}/w" in GOLDEN.files
    for qtype in LEGACY:
        assert f"edges/{qtype.name}/w" in GOLDEN.files


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("name,qtype,weighted", KNOWN, ids=[f"{n}-{q.name}-{'w' if w else 'ref'}" for n, q, w in KNOWN])
def test_bytes_equal_llama_cpp(engine, name, qtype, weighted):
    x, w, expected = golden(name, qtype, weighted)
    got = ggml.encode(x, qtype, weights=w)  # the one entry point every type goes through
    assert got.shape == expected.shape
    bad = np.flatnonzero((got != expected).any(axis=1))
    assert len(bad) == 0, f"rows {bad.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_numpy_and_c_agree_on_fresh_random_data(engine, monkeypatch):
    """Beyond the fixture: the engine in use equals the numpy one on new data, in chunks of 4 rows
    spread over threads (the bytes never depend on the split)."""
    if not NATIVE:
        pytest.skip("one engine only")
    monkeypatch.setattr(kquants, "CHUNK_ELEMENTS", 4 * 512)
    rng = np.random.default_rng(5)
    x = (rng.standard_t(4, (24, 512)) * 0.03).astype(np.float32)
    w = (rng.random(512) ** 3).astype(np.float32)
    for qtype in WEIGHTED:
        for weights in [w] if qtype in LEGACY else [None, w]:
            expected = kquants_numpy.encode_rows(x, qtype, weights)
            assert np.array_equal(kquants.encode(x, qtype, weights, threads=2), expected)
            with parallel_chunks(2):  # a command's pool, as swtool quantize opens
                assert np.array_equal(kquants.encode(x, qtype, weights), expected)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("qtype", sorted(K_TYPES), ids=lambda q: q.name)
def test_decode_equals_gguf_py(engine, qtype):
    x, _, raw = golden("heavy_tails", qtype, True)
    expected = gguf_dequantize(raw, qtype)
    got = kquants.decode(raw, qtype, x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    # the decoded values approximate the input (the bytes are not noise)
    assert np.abs(got - x).mean() < 0.5 * np.abs(x).mean()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("qtype", sorted(kquants.DECODED - set(K_TYPES)), ids=lambda q: q.name)
def test_legacy_decode_equals_gguf_py(engine, qtype):
    """Bit for bit, over random bytes (every level, every fifth bit) under random finite fp16 scales and minimums."""
    rng = np.random.default_rng(int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (64, 8 * size), dtype=np.uint8)
    scales = rng.standard_normal((64, 8, 2)).astype(np.float16).view(np.uint8).reshape(64, 8, 4)
    blocks = raw.reshape(64, 8, size)
    blocks[:, :, :4 if size in (20, 24) else 2] = scales[:, :, :4 if size in (20, 24) else 2]
    expected = gguf_dequantize(raw, qtype)
    got = kquants.decode(raw, qtype, (64, 8 * block))
    assert np.array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("qtype", [QType.Q6_K, QType.Q2_K, QType.Q8_0, QType.Q5_1], ids=lambda q: q.name)
def test_decode_row_range(engine, qtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 512)).astype(np.float32)
    raw = ggml.encode(x, qtype)
    whole = kquants.decode(raw, qtype, x.shape)
    assert whole.shape == x.shape
    part = kquants.decode(raw.reshape(-1), qtype, x.shape, rows=slice(5, 9))
    assert np.array_equal(part, whole.reshape(12, 512)[5:9])
    assert kquants.decode(raw.tobytes(), qtype, x.shape, rows=slice(11, None)).shape == (1, 512)


def test_reference_path_when_weights_are_absent_and_legacy_untouched():
    """K types without weights are ggml's _ref encoders; legacy types without weights stay gguf-py's."""
    x, _, expected = golden("normal", QType.Q4_K, False)
    assert np.array_equal(ggml.encode(torch.from_numpy(x), QType.Q4_K), expected)
    import gguf

    assert np.array_equal(ggml.encode(x, QType.Q4_0), gguf.quants.quantize(x, QType.Q4_0))
    # Q8_0 ignores an importance matrix, as in llama.cpp
    assert np.array_equal(ggml.encode(x, QType.Q8_0, weights=GOLDEN["normal/w"]), gguf.quants.quantize(x, QType.Q8_0))


def test_weights_change_the_bytes_and_lower_the_weighted_error():
    """The weighted search is really used: weighted error (what the imatrix asks for) is lower."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    w = np.where(rng.random(512) < 0.1, 100.0, 0.01).astype(np.float32)
    for qtype in (QType.Q4_K, QType.Q3_K, QType.Q4_0):
        plain = gguf_dequantize(ggml.encode(x, qtype), qtype)
        weighted = gguf_dequantize(ggml.encode(x, qtype, weights=w), qtype)
        assert ((weighted - x) ** 2 * w).sum() < ((plain - x) ** 2 * w).sum()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_half_precision_sources(engine):
    x = torch.from_numpy(GOLDEN["rows_of_256/x"])
    for dtype in (torch.float16, torch.bfloat16):
        assert np.array_equal(ggml.encode(x.to(dtype), QType.Q6_K), ggml.encode(x.to(dtype).to(torch.float32), QType.Q6_K))


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_errors(engine):
    x = np.zeros((2, 256), dtype=np.float32)
    x[1, 7] = np.nan
    with pytest.raises(NonFiniteError):
        ggml.encode(x, QType.Q4_K)
    with pytest.raises(NonFiniteError):
        ggml.encode(np.ones((1, 256), np.float32), QType.Q4_K, weights=np.full(256, np.inf, np.float32))
    with pytest.raises(ValueError, match="multiple"):
        ggml.encode(np.ones((1, 128), np.float32), QType.Q4_K)
    with pytest.raises(ValueError, match="weights"):
        ggml.encode(np.ones((1, 256), np.float32), QType.Q4_K, weights=np.ones(64, np.float32))
    with pytest.raises(ValueError):
        kquants.decode(np.zeros(10, np.uint8), QType.Q4_K, (1, 256))


LLAMA_CPP = os.environ.get("SWTOOL_LLAMA_CPP")


@pytest.mark.llamacpp
@pytest.mark.skipif(not LLAMA_CPP, reason="SWTOOL_LLAMA_CPP is not set (the llama.cpp build/bin folder with libggml-base)")
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda q: q.name)
def test_live_against_llama_cpp(qtype):
    """Larger random inputs of several shapes of distribution, compared with llama.cpp itself."""
    lib = load_ggml(LLAMA_CPP)
    rng = np.random.default_rng(int(qtype))
    n = 2048
    x = np.concatenate([rng.standard_normal((32, n)) * 0.02, rng.standard_t(2, (32, n)) * 0.01, rng.random((16, n)) - 0.2, rng.laplace(size=(16, n)) * 1e-5]).astype(np.float32)
    w = (rng.standard_normal(n) ** 2).astype(np.float32)
    w[rng.random(n) < 0.05] = 0
    for weights in ([None, w] if qtype in K_TYPES else [w]):
        assert np.array_equal(ggml.encode(x, qtype, weights=weights), ggml_quantize(lib, x, qtype, weights))


@pytest.mark.slow  # a compile of its own: about 15 s on a busy two-core machine
def test_portable_build_writes_the_same_bytes(tmp_path):
    """Built without -mavx2 etc. (a CPU without them), the SIMD-lane searches still give llama.cpp's bytes."""
    import ctypes
    import shutil
    import subprocess

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        pytest.skip("no C compiler")
    flags = [f for f in native._flags() if not f.startswith("-m")]
    library = tmp_path / "kquants.so"
    subprocess.run([compiler, *flags, "-o", str(library), str(native.KERNELS / "kquants.c")], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(library))
    lib.kq_encode.argtypes = native.SIGNATURES["kq_encode"]
    for name, qtype, weighted in KNOWN:
        x, w, expected = golden(name, qtype, weighted)
        out = np.zeros_like(expected)
        assert lib.kq_encode(int(qtype), x.ctypes.data, x.shape[0], x.shape[1], None if w is None else w.ctypes.data, out.ctypes.data) == 0
        assert np.array_equal(out, expected), (name, qtype.name, weighted)


@pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {native.status}")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 2),
    exponent=st.integers(-45, 38),
    spread=st.integers(0, 30),
    zeros=st.floats(0, 1),
    qtype=st.sampled_from(WEIGHTED),
    weighted=st.booleans(),
)
def test_engines_agree_on_any_finite_input(seed, rows, blocks, exponent, spread, zeros, qtype, weighted):
    """The C kernels and the numpy engine give the same bytes on arbitrary finite inputs and weights
    (magnitudes from subnormal to near float32's max, mixed, with zeros); both equal llama.cpp on the fixture."""
    rng = np.random.default_rng(seed)
    n = 256 * blocks
    magnitude = 10.0 ** (exponent + rng.integers(-spread, spread + 1, (rows, n)).clip(-45 - exponent, 38 - exponent))
    with np.errstate(over="ignore"):  # beyond float32's range: set to 0 below
        x = (rng.standard_normal((rows, n)) * magnitude * (rng.random((rows, n)) >= zeros)).astype(np.float32)
    x[~np.isfinite(x)] = 0
    w = (rng.random(n) * 10.0 ** rng.integers(-10, 10)).astype(np.float32) if weighted or qtype in LEGACY else None
    assert np.array_equal(kquants.encode(x, qtype, w, threads=1), kquants_numpy.encode_rows(x, qtype, w))
