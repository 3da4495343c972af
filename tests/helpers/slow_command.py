"""Run a real swtool command whose writer is slowed down, so a test can interrupt it mid-write.

    python tests/helpers/slow_command.py quantize MODEL -o OUT ...

Everything is the real command (options, atomic_output, error handling);
only the writers' data paths are wrapped: once the safetensors writer
(ShardedWriter.write) has written its first tensor, or the GGUF copy
(gguf_copy._copy_range) has copied its first one, the command prints
"writing" on stdout and then waits (up to two minutes) for the test to act.
"""

from __future__ import annotations

import sys
import time

import swtool.formats.gguf.rewrite as gguf_copy
from swtool.cli import main
from swtool.formats.hf.writer import ShardedWriter


def wait_for_the_test() -> None:
    print("writing", flush=True)
    time.sleep(120)


original_write = ShardedWriter.write
original_copy = gguf_copy._copy_range


def slow_write(self, name, tensor):
    original_write(self, name, tensor)
    if self._position == 1:
        wait_for_the_test()


def slow_copy(*args):
    original_copy(*args)
    wait_for_the_test()


ShardedWriter.write = slow_write
gguf_copy._copy_range = slow_copy

if __name__ == "__main__":
    sys.argv[0] = "swtool"
    sys.exit(main())
