"""Peak memory and time of `swtool eval` against transformers computing the same perplexity, side by side.

    python bench/eval_memory.py                                  # the random 1.1B benchmark checkpoint, whole Wikipedia text
    python bench/eval_memory.py --chars 30000 --repeat 3         # the first 30,000 characters of the text only
    python bench/eval_memory.py --baseline /path/to/old/tree     # also the swtool of another source tree (old code vs new)

Each round runs, in child processes under /usr/bin/time (wall, user+sys CPU and peak RSS from
the operating system; the page cache is left warm): the baseline tree's `swtool eval MODEL
--text T --ctx C --max-windows N --json` if given, this tree's, and transformers doing the
same computation (bench/transformers_perplexity.py: load the model in bf16, tokenize the
whole text, the same first N windows of C tokens, their mean next-token loss). Rounds are
interleaved; the medians are printed with each peak RSS as a fraction of the reference's,
and the swtool trees' NLL must be bit for bit the same (their JSON `nll`), as must every
tool's token count. The model defaults to /tmp/swtool-bench/1.1b-eval (bench/scan_bench.py
--preset 1.1b writes one like it); the text is fixtures/fetch.py's Wikipedia text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fixtures"))

from fetch import wiki_text  # noqa: E402


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    result: dict


def measure(argv: list[str], env: dict[str, str]) -> Run:
    """argv under /usr/bin/time (forked from a small process, so the child's peak RSS is its own)."""
    with tempfile.NamedTemporaryFile("r") as stats:
        done = subprocess.run(["/usr/bin/time", "-q", "-f", "%e %U %S %M", "-o", stats.name, *argv], env=env, cwd="/", capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
        wall, user, system, rss_kb = stats.read().split()[-4:]
    return Run(float(wall), float(user) + float(system), int(rss_kb) / 1024, json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/swtool-bench/1.1b-eval"))
    parser.add_argument("--chars", type=int, default=0, help="use only the first N characters of the text (0: all of it)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="swtool's --batch (windows per pass through a layer); transformers runs all windows at once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="measure the swtool trees only")
    parser.add_argument("--baseline", type=Path, help="another swtool source tree to measure too (PYTHONPATH), e.g. the code before a change")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "wiki.txt"
        text.write_text(wiki_text(args.chars or None), encoding="utf-8")
        window = ["--ctx", str(args.ctx), "--max-windows", str(args.max_windows)]
        eval_argv = [sys.executable, "-c", "from swtool.cli import main; main()", "eval", str(args.model), "--text", str(text), *window, "--batch", str(args.batch), "--json"]
        tools: dict[str, tuple[list[str], dict[str, str]]] = {}
        if args.baseline:
            tools["swtool eval (baseline)"] = (eval_argv, {**os.environ, "PYTHONPATH": str(args.baseline.resolve())})
        tools["swtool eval (this tree)"] = (eval_argv, {**os.environ, "PYTHONPATH": str(HERE.parent)})
        if not args.no_reference:
            tools["transformers bf16"] = ([sys.executable, str(HERE / "transformers_perplexity.py"), str(args.model), str(text), *window, "--dtype", "bf16"], dict(os.environ))
        print(f"{args.model}, {len(text.read_text(encoding='utf-8')):,} characters of text, {args.max_windows} windows x {args.ctx} tokens; load {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[Run]] = {name: [] for name in tools}
        for index in range(args.repeat):
            for name, (argv, env) in tools.items():
                run = measure(argv, env)
                runs[name].append(run)
                print(f"  round {index + 1} {name:<24} {run.wall_s:6.1f} s wall {run.cpu_s:6.1f} s CPU {run.peak_rss_mb:7.0f} MB  nll {run.result['nll']!r}", flush=True)

    reference = statistics.median(r.peak_rss_mb for r in runs["transformers bf16"]) if "transformers bf16" in runs else None
    print("\n| tool | wall s | CPU s | peak RSS MB | x transformers' peak | nll | ppl |\n|---|---|---|---|---|---|---|")
    for name, group in runs.items():
        rss = statistics.median(r.peak_rss_mb for r in group)
        result = group[0].result
        print(
            f"| {name} | {statistics.median(r.wall_s for r in group):.1f} | {statistics.median(r.cpu_s for r in group):.1f} | "
            f"{rss:.0f} | {f'{rss / reference:.2f}' if reference else '-'} | {result['nll']:.6f} | {result['ppl']:.3f} |"
        )
    print(f"(medians of {args.repeat}; peak RSS of every run: " + "; ".join(f"{name} {[round(r.peak_rss_mb) for r in group]}" for name, group in runs.items()) + ")")
    swtool_nll = {json.dumps(r.result["nll"]) for name, group in runs.items() if name.startswith("swtool") for r in group}
    tokens = {r.result["tokens"] for group in runs.values() for r in group}
    print(f"swtool NLL identical across trees and runs: {len(swtool_nll) == 1} ({', '.join(sorted(swtool_nll))}); token counts equal: {len(tokens) == 1} ({', '.join(map(str, sorted(tokens)))})")


if __name__ == "__main__":
    main()
