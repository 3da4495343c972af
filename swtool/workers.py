"""Run independent chunks of work on a few threads, each torch op single-threaded.

torch's own intra-op parallelism splits every elementwise op across cores and
waits for the slowest thread at the end of each op: on a busy machine one
descheduled thread stalls them all (measured 10x slower at load 10 on two
cores). Inside `parallel_chunks()`, `run_chunks` hands whole chunks to worker
threads instead (torch ops and swtool's C kernels, called through ctypes,
release the GIL) and torch runs each op on the calling thread. The pool and the thread setting are made once per command,
not per tensor: switching torch's thread count is itself slow. Outside the
context, chunks run one after another. Chunks write disjoint slices of
preallocated outputs, so results never depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set for a block, and restored after it (it is process-wide)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def parallel_chunks(workers: int | None = None) -> Iterator[None]:
    """Spread run_chunks over `workers` threads (default: torch's thread count) until the block ends."""
    global _pool
    workers = workers or torch.get_num_threads()
    if workers <= 1 or _pool is not None:
        yield
        return
    with intra_op_threads(1):
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="swtool-chunk")
        try:
            yield
        finally:
            _pool.shutdown()
            _pool = None


def active() -> bool:
    """Whether a parallel_chunks() pool is open (run_chunks spreads work over it)."""
    return _pool is not None


def run_chunks(work: Callable[[T], None], items: Iterable[T]) -> None:
    pool = _pool
    items = list(items)
    if pool is None or len(items) == 1:  # one chunk: no hand-off to a worker and back
        for item in items:
            work(item)
        return
    for future in [pool.submit(work, item) for item in items]:
        future.result()
