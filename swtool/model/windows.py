"""Many windows of tokens through a model one layer at a time: the streaming loop `eval` and `imatrix` share.

All windows go through layer i (in batches) before layer i+1 is loaded, so memory holds the layer
being run and the next one loading (16-bit matrices kept 16-bit, see `stream_windows`) plus the
hidden states of all windows (fp32, in memory or, past a bound, in an unlinked temporary file). Moved out of `swtool.evaluate` so that analysis code (`swtool.input_sums`) can use it
without importing a command module.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from swtool.model.forward import LayerStream, MlpHook

WeightsHook = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""(layer, loaded weights by role) -> the weights to run (edited, smoothed, fake-quantized...)."""


@contextmanager
def hidden_buffer(shape: tuple[int, ...], memory_limit: int) -> Iterator[torch.Tensor]:
    """An fp32 tensor for every window's hidden states: in memory, or memory-mapped from a temporary file when large."""
    nbytes = math.prod(shape) * 4
    if nbytes <= memory_limit:
        yield torch.empty(shape, dtype=torch.float32)
        return
    with tempfile.TemporaryFile(prefix="swtool-hidden-") as fh:
        fh.truncate(nbytes)
        yield torch.from_numpy(np.memmap(fh, dtype=np.float32, mode="r+", shape=shape))


def batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def stream_windows(
    stream: LayerStream,
    windows: torch.Tensor,
    hidden: torch.Tensor,
    batch: int,
    weights_hook: WeightsHook | None = None,
    mlp_hook: MlpHook | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill `hidden` with the last layer's output for every window, one layer (all batches) at a time.

    Without a weights hook, matrices stored in 16 bits stay so (`WeightStream.keep_16bit_matrices`);
    a hook edits or quantizes float32 weights, so they load in float32 as it expects.
    """
    if weights_hook is None:
        stream.keep_16bit_matrices()
    for part in batches(len(windows), batch):
        hidden[part] = stream.embed(windows[part]).float().cpu()
    total = stream.config.num_layers
    for layer, weights in stream.walk():
        if weights_hook is not None:
            weights = weights_hook(layer, weights)
        for part in batches(len(windows), batch):
            h = hidden[part].to(stream.device, stream.dtype)
            hidden[part] = stream.run_layer(layer, h, weights, hook=mlp_hook).float().cpu()
        del weights
        if progress:
            progress(layer + 1, total + 1)
