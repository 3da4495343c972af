"""gguf-py's quantizer as the byte reference for swtool's GGML codecs, and the data that tries their special paths.

Shared by the codec tests (test_ggml_codecs.py, either engine) and the native-kernel tests (test_native.py).
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np

from swtool.codecs.ggml import TYPES


def reference(data: np.ndarray, name: str) -> bytes:
    """gguf-py's encoding of `data` as the GGML type `name`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gguf-py warns on fp16 overflow of huge scales
        return np.asarray(gguf.quants.quantize(data, TYPES[name])).tobytes()


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
