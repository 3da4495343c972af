"""Throughput of swtool's GGML block codecs against gguf-py's reference `gguf.quants.quantize`.

Both encode the same random fp32 matrix; the bytes are checked equal and the
best of --repeat runs is reported, in million values per second of wall time
(swtool uses --threads worker threads, gguf-py one) and per CPU-second (all
threads counted: per-core efficiency, robust to a busy machine).

    python bench/ggml_codecs.py --rows 4096 --cols 4096 --repeat 3 [--threads N] [--types Q8_0,Q4_0]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import version

import gguf
import numpy as np
import torch

from swtool.codecs.ggml import TYPES, encode


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time and best CPU time (all threads of the process) over `repeat` runs, and the result."""
    wall = cpu = float("inf")
    result = None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


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
    print(f"# {args.rows}x{args.cols} fp32, best of {args.repeat}; {platform.machine()}, {os.cpu_count()} CPUs, swtool threads={threads}, torch {torch.__version__}, gguf-py {version('gguf')}")
    print(f"# load average before: {os.getloadavg()[0]:.1f}")
    print("| type | gguf-py Mval/s | swtool Mval/s | speed-up (wall) | gguf-py Mval/CPU-s | swtool Mval/CPU-s | per-CPU-s ratio | bytes equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in args.types.split(","):
        qtype = TYPES[name]
        ref_wall, ref_cpu, ref = best_time(lambda: gguf.quants.quantize(data, qtype), args.repeat)
        our_wall, our_cpu, ours = best_time(lambda: encode(data, qtype, threads=threads), args.repeat)
        equal = np.asarray(ref).tobytes() == ours.tobytes()
        m = data.size / 1e6
        print(
            f"| {name} | {m / ref_wall:.1f} | {m / our_wall:.1f} | {ref_wall / our_wall:.1f}x | {m / ref_cpu:.1f} | {m / our_cpu:.1f} | {ref_cpu / our_cpu:.1f}x | {equal} |",
            flush=True,
        )
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
