"""Run a real swtool command whose safetensors writer is slowed down, so a test can interrupt it mid-write.

    python tests/slow_command.py quantize MODEL -o OUT ...

Everything is the real command (options, atomic_output, error handling);
only ShardedWriter.write, once it has written the first tensor, prints
"writing" on stdout and then waits (up to two minutes) for the test to act.
"""

from __future__ import annotations

import sys
import time

from swtool.checkpoint.safetensors_out import ShardedWriter
from swtool.cli import main

original = ShardedWriter.write


def slow_write(self, name, tensor):
    original(self, name, tensor)
    if self._position == 1:
        print("writing", flush=True)
        time.sleep(120)


ShardedWriter.write = slow_write

if __name__ == "__main__":
    sys.argv[0] = "swtool"
    sys.exit(main())
