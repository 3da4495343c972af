"""Wall and CPU time of `swtool scan MODEL --json`, this tree against another (the code before a change), interleaved.

    python bench/scan_verdict_cost.py MODEL --baseline /path/to/old/tree --repeat 5

Each round runs the baseline scan, then this tree's, in child processes (PYTHONPATH
selects the tree); CPU time is the child's user + system time (wait4), which a busy shared
machine inflates less than wall time. Prints every run, the medians and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(tree: Path, model: str, extra: list[str]) -> tuple[float, float]:
    """Wall time and the child's own CPU time (user + system, from wait4) of one scan."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "swtool.cli", "scan", model, "--json", *extra], env={**os.environ, "PYTHONPATH": str(tree)}, cwd="/",  # not a source tree: -m puts the cwd first on sys.path
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"scan failed in {tree}: {child.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--extra", default="", help="more scan options for this tree only, e.g. '--max-verify 1'")
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "this tree": []}
    for round_number in range(args.repeat):
        for name, tree, extra in (("baseline", args.baseline, []), ("this tree", HERE, args.extra.split())):
            wall, cpu = run(tree, args.model, extra)
            times[name].append((wall, cpu))
            print(f"round {round_number + 1}: {name:9}  wall {wall:6.2f} s  CPU {cpu:6.2f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
    med = {name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)) for name, runs in times.items()}
    for name, (wall, cpu) in med.items():
        print(f"median {name:9}  wall {wall:6.2f} s  CPU {cpu:6.2f} s")
    print(f"ratio this tree / baseline: wall {med['this tree'][0] / med['baseline'][0]:.2f}, CPU {med['this tree'][1] / med['baseline'][1]:.2f}")


if __name__ == "__main__":
    main()
