"""K-quant GGUF speed against llama.cpp and transformers, as whole processes, interleaved and repeated.

On SmolLM2-135M-Instruct (fixtures/fetch.py), three measurements, each side by side in the same run:
1. HF directory (fp16 safetensors) -> Q4_K_M GGUF: `swtool quantize HF -o out.gguf --type Q4_K_M`
   (one streamed pass) against llama.cpp's `convert_hf_to_gguf.py --outtype f16` followed by
   `llama-quantize F16 Q4_K_M` (wall seconds of both together, CPU seconds, peak RSS of each process);
2. F16 GGUF -> Q4_K_M: `swtool quantize` against `llama-quantize` (same input file, CPU seconds);
3. scanning the Q4_K_M file: `swtool scan` against transformers' GGUF load + a hooked forward
   (bench/transformers_scan.py MODEL.gguf).
Prints medians of --repeat runs (the machine is shared: the order alternates every round) and the ratios.

    SWTOOL_LLAMA_CPP=/path/llama.cpp/build/bin python bench/kquant_pipeline.py --repeat 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))

from fetch import smollm2_gguf  # noqa: E402

HERE = Path(__file__).resolve().parent


def measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall s, user+sys CPU s, peak RSS MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss counts the forked parent too: keep it small


def chained(*steps: tuple[float, float, float]) -> tuple[float, float, float]:
    """Steps run one after the other: summed wall and CPU, the largest peak RSS."""
    return sum(s[0] for s in steps), sum(s[1] for s in steps), max(s[2] for s in steps)


def swtool(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "swtool.cli", *map(str, args)]


def report(title: str, runs: dict[str, list[tuple[float, float, float]]]) -> None:
    print(f"\n{title}\n\n| command | median wall (s) | median CPU (s) | peak RSS (MB) | runs |")
    print("|---|---:|---:|---:|---:|")
    medians = {}
    for label, values in runs.items():
        medians[label] = [statistics.median(v[i] for v in values) for i in range(3)]
        wall, cpu, rss = medians[label]
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {max(v[2] for v in values):.0f} | {len(values)} |")
    (a, ma), (b, mb) = list(medians.items())[:2]
    print(f"\n{b} / {a}: wall {mb[0] / ma[0]:.2f}x, CPU {mb[1] / ma[1]:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swtool-kquant-bench"))
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--only", default="convert,quantize,scan", help="which of the three measurements to make")
    parser.add_argument("--hf", type=Path, help="an HF directory to use instead of SmolLM2 (e.g. bench/scan_bench.py's random 1.1B)")
    args = parser.parse_args()
    bin_dir = Path(os.environ.get("SWTOOL_LLAMA_CPP", ""))
    if not (bin_dir / "llama-quantize").is_file():
        sys.exit("set SWTOOL_LLAMA_CPP to llama.cpp's build/bin")
    source_dir = bin_dir.parents[1]
    converter = source_dir / "convert_hf_to_gguf.py"
    converter_env = {**os.environ, "PYTHONPATH": str(source_dir / "gguf-py")}
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    hf = args.hf or work / "smollm2-hf"
    if not (hf / "config.json").is_file():  # in a child: this process stays small, as its RSS is inherited by every fork it measures
        export = ("import sys, torch; from swtool.formats.hf.export import export_hf; from swtool.formats.open import open_checkpoint; "
                  "from pathlib import Path; Path(sys.argv[2]).mkdir(parents=True, exist_ok=True); "
                  "export_hf(open_checkpoint(Path(sys.argv[1])), Path(sys.argv[2]), torch.float16)")
        subprocess.run([sys.executable, "-c", export, str(smollm2_gguf()), str(hf)], check=True)
    f16, mixed = work / f"{hf.name}-f16.gguf", work / f"{hf.name}-{args.mix}.gguf"
    subprocess.run(swtool("quantize", hf, "-o", f16, "--type", "F16", "--no-keep-super", "--force", "-q"), check=True)
    subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(mixed), args.mix, str(args.threads)], check=True, capture_output=True)
    only = set(args.only.split(","))
    print(f"# {args.hf or 'SmolLM2-135M-Instruct'}, {args.repeat} alternating rounds, llama.cpp threads {args.threads}, load average {os.getloadavg()[0]:.1f}")

    if "convert" in only:
        runs: dict[str, list] = {f"convert_hf_to_gguf.py --outtype f16 + llama-quantize {args.mix}": [], f"swtool quantize HF --type {args.mix}": []}
        for round_ in range(args.repeat):
            ours = lambda: measured(swtool("quantize", hf, "-o", work / "sw.gguf", "--type", args.mix, "--no-keep-super", "--force", "-q"))  # noqa: E731
            theirs = lambda: chained(  # noqa: E731
                measured([sys.executable, str(converter), str(hf), "--outtype", "f16", "--outfile", str(work / "conv-f16.gguf")], converter_env),
                measured([str(bin_dir / "llama-quantize"), str(work / "conv-f16.gguf"), str(work / "lq.gguf"), args.mix, str(args.threads)]),
            )
            for label, run in (list(zip(runs, (theirs, ours))))[:: 1 if round_ % 2 == 0 else -1]:
                runs[label].append(run())
        report(f"HF directory -> {args.mix} GGUF", runs)

    if "quantize" in only:
        runs = {f"llama-quantize F16 {args.mix} {args.threads}": [], f"swtool quantize F16.gguf --type {args.mix}": []}
        for round_ in range(args.repeat):
            pair = [
                lambda: measured([str(bin_dir / "llama-quantize"), str(f16), str(work / "lq2.gguf"), args.mix, str(args.threads)]),
                lambda: measured(swtool("quantize", f16, "-o", work / "sw2.gguf", "--type", args.mix, "--no-keep-super", "--force", "-q")),
            ]
            for label, run in list(zip(runs, pair))[:: 1 if round_ % 2 == 0 else -1]:
                runs[label].append(run())
        report(f"F16 GGUF -> {args.mix} GGUF", runs)

    if "scan" in only:
        runs = {f"transformers GGUF load + hooked forward ({args.mix})": [], f"swtool scan {args.mix}.gguf": []}
        for round_ in range(args.repeat):
            pair = [
                lambda: measured([sys.executable, str(HERE / "transformers_scan.py"), str(mixed)]),
                lambda: measured(swtool("scan", mixed, "--json")),
            ]
            for label, run in list(zip(runs, pair))[:: 1 if round_ % 2 == 0 else -1]:
                runs[label].append(run())
        report(f"Scanning the {args.mix} file", runs)


if __name__ == "__main__":
    main()
