"""Run independent chunks of work on a few threads, each torch op single-threaded.

torch's own intra-op parallelism splits every elementwise op across cores and
waits for the slowest thread at the end of each op: on a busy machine, one
descheduled thread stalls them all (measured: 10x slower at load 10 on two
cores). Handing whole chunks to worker threads instead (torch releases the GIL
inside ops) keeps all cores busy without a barrier per op. Chunks write
disjoint slices of preallocated outputs, so the result is independent of the
number of workers and of scheduling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def run_chunks(work: Callable[[T], None], items: Iterable[T]) -> None:
    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        for item in items:
            work(item)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(work, item) for item in items]:
                future.result()
    finally:
        torch.set_num_threads(previous)
