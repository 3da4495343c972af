"""How fast swtool answers what needs no model: --help, --version, directory, a missing path.

Runs each command REPEAT times, interleaved between the trees given (e.g. this checkout and an
older one), as the real console entry point in a fresh process, and prints the median wall time
and peak RSS of each (ru_maxrss of the child).

    python bench/startup.py --tree new=. --tree old=/path/to/older/checkout --repeat 5

Each command runs in its tree (cwd and PYTHONPATH), so an editable install elsewhere does not leak in.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["--version"], ["directory"], ["scan", "/no/such/model"], ["quantize", "/no/such/model", "-o", "/tmp/x"]]


def wall_time(tree: str, argv: list[str]) -> float:
    """Seconds for the console entry point to answer, start to exit."""
    code = "import sys; sys.argv = ['swtool', *sys.argv[1:]]; from swtool.cli import main; main()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], env={**os.environ, "PYTHONPATH": tree}, cwd=tree, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a swtool checkout")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    print(f"{'command':42} " + " ".join(f"{name + ' s':>10} {name + ' MB':>10}" for name in trees))
    for argv in COMMANDS:
        times: dict[str, list[float]] = {name: [] for name in trees}
        peaks: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                times[name].append(wall_time(tree, argv))
                peaks[name].append(peak_rss(tree, argv))
        cells = " ".join(f"{statistics.median(times[n]):>10.3f} {statistics.median(peaks[n]):>10.0f}" for n in trees)
        print(f"{' '.join(argv):42} {cells}")


def peak_rss(tree: str, argv: list[str]) -> float:
    """Peak RSS in MB of one run: the child reports its own ru_maxrss once the command has answered."""
    code = (
        "import resource, sys, os; sys.argv = ['swtool', *sys.argv[1:]]\n"
        "from swtool import cli\n"
        "try:\n    cli.app(standalone_mode=False)\nexcept BaseException:\n    pass\n"
        "os.write(2, b'RSS %d' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], env={**os.environ, "PYTHONPATH": tree}, cwd=tree, capture_output=True, text=True)
    return int(result.stderr.rsplit("RSS ", 1)[1]) / 1024


if __name__ == "__main__":
    main()
