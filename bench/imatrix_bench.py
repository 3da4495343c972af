"""Wall time and peak memory of `swtool imatrix` against llama-imatrix, same model (F16 GGUF) and text.

On SmolLM2-135M-Instruct (the Q4_1 GGUF from fixtures/fetch.py, written once as F16 by swtool,
the common input of both) and the Wikipedia text from fixtures/fetch.py, each tool runs as its own
process, --repeat times, alternating; reported per run: wall seconds, user+sys CPU seconds and
peak RSS (ru_maxrss of the child), then the median of each. Also checks that the two files agree
(token counts equal; median relative difference of the in_sum2 columns). Needs SWTOOL_LLAMA_CPP.

    SWTOOL_LLAMA_CPP=/path/to/llama.cpp/build/bin python bench/imatrix_bench.py --ctx 512 --chunks 8 --threads 2 --repeat 3

`--model F16.gguf` measures another model (e.g. the random 1.1B benchmark checkpoint written as F16 by
`swtool quantize DIR -o F16.gguf --type F16 --no-keep-super`); `--memory-limit MB` runs both tools in a
memory cgroup of that size (root, cgroup v1 or v2), to show a model larger than the memory it may use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))

from fetch import smollm2_gguf, wiki_text  # noqa: E402

from swtool.formats.open import open_checkpoint  # noqa: E402
from swtool.formats.gguf.imatrix import read_imatrix  # noqa: E402
from swtool.formats.gguf.writer import plan_gguf, save_gguf  # noqa: E402


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, user+sys CPU s, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{child.stderr.read()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def limited(megabytes: int) -> list[str]:
    """A command prefix that runs the rest inside a memory cgroup of `megabytes` (made here; needs root)."""
    v1 = Path("/sys/fs/cgroup/memory")
    group = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / "swtool-imatrix-bench"
    group.mkdir(exist_ok=True)
    (group / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(megabytes << 20))
    return ["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "limited"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", type=Path, help="an F16 GGUF to measure instead of SmolLM2")
    parser.add_argument("--memory-limit", type=int, metavar="MB", help="run both tools in a memory cgroup of this size")
    args = parser.parse_args()
    binaries = Path(os.environ["SWTOOL_LLAMA_CPP"])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or folder / "smollm2-f16.gguf"
        if args.model is None:
            source = open_checkpoint(smollm2_gguf())
            save_gguf(source, plan_gguf(source, "F16"), model)
        prefix = limited(args.memory_limit) if args.memory_limit else []
        text = folder / "wiki.txt"
        text.write_text(wiki_text()[:200_000])
        common = ["--ctx", str(args.ctx), "--chunks", str(args.chunks)]
        swtool = [*prefix, sys.executable, "-m", "swtool.cli", "imatrix", str(model), "--text", str(text), "-q", "--force", *common, "-o", str(folder / "swtool.gguf")]
        llama = [*prefix, str(binaries / "llama-imatrix"), "-m", str(model), "-f", str(text), "-c", str(args.ctx), "--chunks", str(args.chunks),
                 "-t", str(args.threads), "--no-ppl", "-o", str(folder / "llama.gguf")]
        envs = {
            "swtool": {**os.environ, "OMP_NUM_THREADS": str(args.threads)},  # torch's intra-op threads
            "llama-imatrix": {**os.environ, "LD_LIBRARY_PATH": str(binaries)},
        }
        runs: dict[str, list[tuple[float, float, float]]] = {"swtool": [], "llama-imatrix": []}
        limit = f", memory limit {args.memory_limit} MB" if args.memory_limit else ""
        print(f"# {model.name} ({model.stat().st_size / 1e9:.2f} GB){limit}, ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        for _ in range(args.repeat):
            for name, command in (("swtool", swtool), ("llama-imatrix", llama)):
                if args.memory_limit:  # pages already cached are charged to whoever read them first, not to the cgroup
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                runs[name].append(measure(command, envs[name]))
                print(f"{name:14s} wall {runs[name][-1][0]:6.2f} s  cpu {runs[name][-1][1]:6.2f} s  peak RSS {runs[name][-1][2]:7.1f} MiB", flush=True)
        print("\n| tool | wall s (median) | CPU s (median) | peak RSS MiB (median) |\n|---|---|---|---|")
        for name, values in runs.items():
            print(f"| {name} | {statistics.median(v[0] for v in values):.2f} | {statistics.median(v[1] for v in values):.2f} | {statistics.median(v[2] for v in values):.0f} |")
        ours, theirs = read_imatrix(folder / "swtool.gguf"), read_imatrix(folder / "llama.gguf")
        assert sorted(ours.entries) == sorted(theirs.entries)
        assert all((ours.entries[n].counts == e.counts).all() for n, e in theirs.entries.items())
        relative = np.concatenate([(np.abs(ours.entries[n].in_sum2 - e.in_sum2) / np.abs(e.in_sum2)).ravel() for n, e in theirs.entries.items()])
        print(f"\nfiles agree: {len(ours.entries)} weights, counts equal, in_sum2 columns differ by {np.median(relative):.2e} (median), {np.percentile(relative, 99):.2e} (99th percentile)")
        print(f"commands:\n  {' '.join(swtool)}\n  {' '.join(llama)}")


if __name__ == "__main__":
    main()
