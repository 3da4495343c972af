"""swtool's GGUF files against llama.cpp's own llama-quantize, judged by llama-perplexity.

On SmolLM2-135M-Instruct (the Q4_1 GGUF from fixtures/fetch.py):
1. swtool writes an F16 GGUF from the model (the common source of everything below);
2. swtool writes Q8_0 and Q4_0 (--types: any mix, Q4_K_M...) from that F16 file; llama-quantize does the same;
3. swtool writes Q4_0 (--protect) with --keep-super (--super-types Q8_0 and F16, or Q6_K), the super
   weights found by swtool's own scan of the F16 file;
4. llama-perplexity runs every file on the same Wikipedia text.

Prints a markdown table (perplexity, file size, time to write the file: for
swtool from opening the input to the renamed output, in this process; for
llama-quantize the whole process, wall and user+sys CPU) and the exact
commands; then, for Q8_0 and Q4_0, the whole `swtool quantize` command as a
process against llama-quantize, --repeat times each, alternating. Needs
SWTOOL_LLAMA_CPP (the llama.cpp bin folder).

    SWTOOL_LLAMA_CPP=/path/to/llama.cpp/build/bin python bench/llamacpp_compare.py --ctx 512 --chunks 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))

from fetch import smollm2_gguf, wiki_text  # noqa: E402

from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.open import open_checkpoint  # noqa: E402
from swtool.supers import Held  # noqa: E402


def swtool_write(source: Path, out: Path, type_name: str, **options) -> tuple[float, float]:
    """(wall, CPU) seconds of writing `out` in this process (imports excluded)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    checkpoint = open_checkpoint(source)
    save_gguf(checkpoint, plan_gguf(checkpoint, type_name, **options), out, force=True)
    return time.perf_counter() - start, time.process_time() - start_cpu


def timed_process(command: list[str]) -> tuple[float, float]:
    """(wall, user+sys CPU) seconds of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def llama_quantize(bin_dir: Path, source: Path, out: Path, type_name: str, threads: int) -> tuple[float, float]:
    return timed_process([str(bin_dir / "llama-quantize"), str(source), str(out), type_name, str(threads)])


def swtool_command(source: Path, out: Path, type_name: str) -> tuple[float, float]:
    """The whole `swtool quantize --format gguf` process (interpreter start, imports, hashing the input)."""
    return timed_process([sys.executable, "-m", "swtool.cli", "quantize", str(source), "-o", str(out), "--format", "gguf",
                          "--type", type_name, "--no-keep-super", "--force", "-q"])


def perplexity(bin_dir: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    command = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"llama-perplexity failed on {model}:\n{output[-2000:]}")
    return float(found.group(1)), float(found.group(2)), time.perf_counter() - start


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """How many tensors hold the same type and bytes in both files."""
    left = {t.name: t for t in gguf.GGUFReader(a).tensors}
    right = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = sum(
        1
        for name, t in left.items()
        if name in right and t.tensor_type == right[name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(right[name].data))
    )
    return same, len(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-chars", type=int, default=200_000, help="Wikipedia characters given to llama-perplexity")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swtool-llamacpp-bench"))
    parser.add_argument("--skip-perplexity", action="store_true", help="only write the files and time that")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each whole-process timing (0: none)")
    parser.add_argument("--types", default="Q8_0,Q4_0", help="types/mixes written by both swtool and llama-quantize")
    parser.add_argument("--protect", default="Q4_0", help="types/mixes swtool also writes with --keep-super")
    parser.add_argument("--super-types", default="Q8_0,F16", help="--super-type values tried on each --protect type")
    args = parser.parse_args()
    bin_dir = Path(os.environ.get("SWTOOL_LLAMA_CPP", ""))
    if not (bin_dir / "llama-perplexity").is_file():
        sys.exit("set SWTOOL_LLAMA_CPP to the folder holding llama-perplexity and llama-quantize")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    text = work / "wiki.txt"
    text.write_text(wiki_text(args.text_chars))

    f16 = work / "smollm2-f16.gguf"
    print(f"# load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[tuple[str, Path, tuple[float, float]]] = [("swtool F16 (source of the rest)", f16, swtool_write(smollm2_gguf(), f16, "F16"))]

    from swtool.detect import scan

    checkpoint = open_checkpoint(f16)
    by_stored = {checkpoint.stored_name(n): n for n in checkpoint.names()}
    supers = [Held(by_stored[w.tensor], w.row, w.col) for w in scan(checkpoint).super_weights]
    print(f"# super weights found by swtool scan of the F16 file: {[(checkpoint.stored_name(s.tensor), s.row, s.col) for s in supers]}", flush=True)

    types, protect, super_types = (value.split(",") for value in (args.types, args.protect, args.super_types))
    for type_name in types:
        ours, theirs = work / f"swtool-{type_name}.gguf", work / f"llamacpp-{type_name}.gguf"
        rows.append((f"swtool {type_name}", ours, swtool_write(f16, ours, type_name)))
        rows.append((f"llama-quantize {type_name}", theirs, llama_quantize(bin_dir, f16, theirs, type_name, args.threads)))
        same, total = identical_tensors(ours, theirs)
        print(f"# {type_name}: {same} of {total} tensors identical (type and bytes) between swtool and llama-quantize", flush=True)
    for type_name in protect:
        for super_type in super_types:
            out = work / f"swtool-{type_name}-keep-super-{super_type}.gguf"
            seconds = swtool_write(f16, out, type_name, super_weights=supers, keep_super=True, super_type=super_type)
            rows.append((f"swtool {type_name} --keep-super --super-type {super_type}", out, seconds))

    print(f"\nllama-perplexity -f wiki.txt ({args.text_chars} chars of Wikipedia) -c {args.ctx} --chunks {args.chunks} -t {args.threads}\n")
    print("| file | size (MB) | write wall (s) | write CPU (s) | perplexity | ppl eval time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, path, (wall, cpu) in rows:
        if args.skip_perplexity:
            print(f"| {label} | {path.stat().st_size / 1e6:.1f} | {wall:.2f} | {cpu:.2f} | | |", flush=True)
            continue
        ppl, err, eval_seconds = perplexity(bin_dir, path, text, args.ctx, args.chunks, args.threads)
        print(f"| {label} | {path.stat().st_size / 1e6:.1f} | {wall:.2f} | {cpu:.2f} | {ppl:.4f} ± {err:.4f} | {eval_seconds:.0f} |", flush=True)

    if not args.repeat:
        return
    print(f"\nWhole processes from the F16 file, best and median of {args.repeat} alternating runs (load average {os.getloadavg()[0]:.1f}):\n")
    print("| type | command | best wall (s) | median wall (s) | best CPU (s) | median CPU (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for type_name in types:
        times: dict[str, list[tuple[float, float]]] = {"swtool quantize": [], "llama-quantize": []}
        for _ in range(args.repeat):
            times["swtool quantize"].append(swtool_command(f16, work / f"cli-{type_name}.gguf", type_name))
            times["llama-quantize"].append(llama_quantize(bin_dir, f16, work / f"llamacpp-{type_name}.gguf", type_name, args.threads))
        for command, runs in times.items():
            walls, cpus = sorted(w for w, _ in runs), sorted(c for _, c in runs)
            print(f"| {type_name} | {command} | {walls[0]:.2f} | {walls[len(walls) // 2]:.2f} | {cpus[0]:.2f} | {cpus[len(cpus) // 2]:.2f} |", flush=True)
    print(f"\n# load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
