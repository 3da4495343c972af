"""Single-core encode throughput of swtool's K-quant kernels next to llama.cpp's, on the same matrix in the same run.

    python bench/kquants_speed.py LLAMA_CPP_BUILD_BIN [rows] [cols]

Both sides are timed as one call on one thread (swtool: kquants.encode(threads=1), which
calls kernels/kquants.c per chunk of rows; llama.cpp: ggml_quantize_chunk through ctypes,
what llama-quantize calls per chunk), best of three, weighted (imatrix) and not.
The bytes are compared too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "codecs"))
from kquants_golden import K_TYPES, LEGACY, ggml_quantize, load_ggml

from swtool import native
from swtool.codecs import kquants


def best_of(fn, repeat: int = 3) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    lib = load_ggml(sys.argv[1])
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    cols = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    assert native.kernels() is not None, native.status
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w = (rng.standard_normal(cols) ** 2).astype(np.float32)
    mvals = rows * cols / 1e6
    print(f"{rows}x{cols} float32, one thread; M values/s (higher is better)")
    print(f"{'type':<6} {'imatrix':<8} {'swtool':>8} {'llama.cpp':>10} {'ratio':>6}  bytes")
    for qtype in (*sorted(K_TYPES), *LEGACY):
        for weights in ([None, w] if qtype in K_TYPES else [w]):
            ours_t, ours = best_of(lambda q=qtype, w=weights: kquants.encode(x, q, w, threads=1))
            ref_t, ref = best_of(lambda q=qtype, w=weights: ggml_quantize(lib, x, q, w))
            same = "equal" if np.array_equal(ours, ref) else "DIFFER"
            print(f"{qtype.name:<6} {'yes' if weights is not None else 'no':<8} {mvals / ours_t:8.1f} {mvals / ref_t:10.1f} {ref_t / ours_t:6.2f}  {same}")


if __name__ == "__main__":
    main()
