"""Throughput of swtool's GGML block codecs against gguf-py's reference `gguf.quants.quantize`.

Both encode the same random fp32 matrix; the bytes are checked equal and the
best of --repeat runs is reported (million values per second) with the ratio.

    python bench/ggml_codecs.py --rows 4096 --cols 4096 --repeat 3 [--threads N] [--types Q8_0,Q4_0]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import gguf
import numpy as np
import torch

from swtool.quant.ggml import TYPES, encode


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="swtool worker threads (default: torch.get_num_threads())")
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,BF16,F16")
    args = parser.parse_args()

    data = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32)
    threads = args.threads or torch.get_num_threads()
    print(f"# {args.rows}x{args.cols} fp32, best of {args.repeat}; {platform.machine()}, {os.cpu_count()} CPUs, swtool threads={threads}, torch {torch.__version__}, gguf-py {gguf.__version__ if hasattr(gguf, '__version__') else ''}")
    print(f"{'type':6} {'gguf-py Mval/s':>15} {'swtool Mval/s':>14} {'speed-up':>9} {'bytes equal':>12}")
    for name in args.types.split(","):
        qtype = TYPES[name]
        ref_time, ref = best_time(lambda: gguf.quants.quantize(data, qtype), args.repeat)
        our_time, ours = best_time(lambda: encode(data, qtype, threads=threads), args.repeat)
        equal = np.asarray(ref).tobytes() == ours.tobytes()
        rate = data.size / 1e6
        print(f"{name:6} {rate / ref_time:15.1f} {rate / our_time:14.1f} {ref_time / our_time:8.1f}x {str(equal):>12}", flush=True)


if __name__ == "__main__":
    main()
