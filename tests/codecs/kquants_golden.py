"""llama.cpp's own bytes for the K-quants and the importance-weighted legacy types, as golden fixtures.

Why: swtool's encoders (swtool/codecs/kquants.py) must write exactly what
llama-quantize writes, and CI has no llama.cpp. This script calls llama.cpp's
ggml_quantize_chunk (the function llama-quantize calls per chunk of rows; in
libggml-base, loaded with ctypes) on small seeded inputs and edge cases, with
no importance matrix and with a known one, and stores inputs and bytes in
kquants_golden.npz next to this file (about 150 KB). test_kquants.py compares
swtool's bytes with them; with SWTOOL_LLAMA_CPP set it also compares live on
larger random inputs through `ggml_quantize` below.

Regenerate (after changing the cases, or to check a newer llama.cpp):
    python tests/codecs/kquants_golden.py /path/to/llama.cpp/build/bin
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

FIXTURE = Path(__file__).with_name("kquants_golden.npz")
K_TYPES = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
LEGACY = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)
WEIGHTED = K_TYPES + LEGACY
"""Unweighted legacy bytes are gguf-py's (tested in test_ggml_codecs.py); weighted ones are llama.cpp's alone."""


def load_ggml(bin_dir: str | Path) -> ctypes.CDLL:
    """llama.cpp's libggml-base from its build folder (bin/ or the cmake tree below it)."""
    root = Path(bin_dir)
    for candidate in (root / "libggml-base.so", root.parent / "ggml" / "src" / "libggml-base.so", root / "libggml-base.dylib"):
        if candidate.exists():
            lib = ctypes.CDLL(str(candidate))
            break
    else:
        raise FileNotFoundError(f"no libggml-base in {root}")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: QType, weights: np.ndarray | None) -> np.ndarray:
    """llama.cpp's bytes for (rows, n) float32 `x` (one call, as llama-quantize makes per chunk)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None if w is None else w.ctypes.data)
    assert written == out.size, (written, out.size)
    return out


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> ((rows, n) float32 values, (n,) float32 importance): seeded random rows and edge cases."""
    rng = np.random.default_rng(20261207)

    def importance(n: int, zeros: bool = False) -> np.ndarray:
        w = (rng.standard_normal(n) ** 2 + 0.05 * rng.random(n)).astype(np.float32)
        w[rng.integers(0, n, n // 32)] *= 50  # a few hot channels, as in real imatrices
        if zeros:
            w[rng.random(n) < 0.2] = 0.0  # unused channels
        return w

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out["normal"] = (rng.standard_normal((6, 512)).astype(np.float32) * 0.02, importance(512))
    out["heavy_tails"] = (rng.standard_t(3, (4, 512)).astype(np.float32) * 0.05, importance(512, zeros=True))
    out["uniform_shifted"] = ((rng.random((2, 256)) * 3 + 1).astype(np.float32), importance(256))  # all positive, far from 0
    out["rows_of_256"] = (rng.standard_normal((5, 256)).astype(np.float32), importance(256))
    edge = np.zeros((8, 256), dtype=np.float32)
    edge[1] = rng.standard_normal(256) * 1e-3
    edge[1, 77] = 40.0  # a single huge value (a super weight)
    edge[2] = -np.abs(rng.standard_normal(256)).astype(np.float32)  # negative only
    edge[3] = rng.standard_normal(256) * 1e-7  # scales far below fp16's normal range (subnormal or zero)
    edge[4] = rng.standard_normal(256) * 3e-5  # scales around fp16's subnormal boundary
    edge[5, :128] = 0.0  # half zero, half ordinary
    edge[5, 128:] = rng.standard_normal(128)
    edge[6] = 0.25  # constant
    edge[7] = np.round(rng.standard_normal(256) * 4) / 4  # few distinct values, exact ties
    out["edges"] = (edge, importance(256, zeros=True))
    one_hot = np.zeros((2, 256), dtype=np.float32)
    one_hot[0, 3] = 1.0
    one_hot[1, 200] = -2.5
    out["one_value"] = (one_hot, np.ones(256, dtype=np.float32))
    extreme = np.empty((6, 256), dtype=np.float32)
    extreme[0] = rng.standard_normal(256) * 1e30  # squares overflow: NaN scales, which ggml's scans skip
    extreme[1] = rng.standard_normal(256) * 10.0 ** rng.integers(-20, 20, 256)  # mixed magnitudes
    extreme[2] = rng.standard_normal(256) * 1e-40  # float32 subnormals
    extreme[3] = rng.standard_normal(256) * 1e6  # scales beyond fp16's range
    extreme[4] = rng.standard_normal(256)
    extreme[4, ::7] = -0.0  # signed zeros
    extreme[5] = -0.0
    out["extremes"] = (extreme, importance(256))
    out["huge_weights"] = (rng.standard_normal((2, 256)).astype(np.float32), np.full(256, 1e20, dtype=np.float32))
    out["row_of_288"] = (rng.standard_normal((3, 288)).astype(np.float32), importance(288))  # 9 blocks of 32: legacy only
    for seed, qtype in FUZZ_FOUND:
        out[f"fuzz_{seed}"] = fuzz_case(seed, qtype)
    return out


FUZZ_FOUND = ((4083939144, QType.Q2_K), (2989019788, QType.Q4_1), (301243838, QType.Q5_K))
"""Inputs where an earlier numpy engine differed from llama.cpp (a max scan's zero sign), found by fuzz_case."""


def fuzz_case(seed: int, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """The random input (magnitudes from 1e-45 to 1e38, mixed, with zeros) and `qtype`'s weights that a
    fuzz comparison with llama.cpp drew for `seed` (it drew weights for every type in WEIGHTED order)."""
    rng = np.random.default_rng(seed)
    rows, n = rng.integers(1, 4), 256 * rng.integers(1, 3)
    exponent, spread, zeros = rng.integers(-45, 39), rng.integers(0, 31), rng.random()
    magnitude = 10.0 ** (exponent + rng.integers(-spread, spread + 1, (rows, n)).clip(-45 - exponent, 38 - exponent))
    with np.errstate(all="ignore"):
        x = (rng.standard_normal((rows, n)) * magnitude * (rng.random((rows, n)) >= zeros)).astype(np.float32)
    x[~np.isfinite(x)] = 0
    for candidate in WEIGHTED:
        weighted = rng.random() < 0.5 or candidate in LEGACY
        w = (rng.random(n) * 10.0 ** rng.integers(-30, 30)).astype(np.float32) if weighted else np.ones(n, dtype=np.float32)
        if weighted and rng.random() < 0.2:
            w[rng.random(n) < 0.5] = 0
        if candidate == qtype:
            return x, w
        rng.random()
    raise ValueError(qtype)


def generate(bin_dir: str | Path) -> dict[str, np.ndarray]:
    lib = load_ggml(bin_dir)
    arrays: dict[str, np.ndarray] = {}
    for name, (x, w) in cases().items():
        arrays[f"{name}/x"] = x
        arrays[f"{name}/w"] = w
        for qtype in WEIGHTED:
            if x.shape[1] % GGML_QUANT_SIZES[qtype][0]:
                continue
            if qtype in K_TYPES:
                arrays[f"{name}/{qtype.name}"] = ggml_quantize(lib, x, qtype, None)
            arrays[f"{name}/{qtype.name}/w"] = ggml_quantize(lib, x, qtype, w)
    return arrays


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} LLAMA_CPP_BUILD_BIN")
    arrays = generate(sys.argv[1])
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes, {len(arrays)} arrays)")
