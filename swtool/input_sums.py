"""Per-column sums of every linear layer's input over windows of text, streamed layer by layer.

What an importance matrix is made of: for each projection (attention, MLP, router, each routed
expert) the sum over tokens of x_j^2 and of x_j for every input channel j, and how many tokens
were summed. It rides the same machinery as `swtool eval`: all windows go through layer i (in
batches, hidden states in memory or spilled to a temporary file past `memory_limit`) before layer
i+1 loads, and an `InputHook` on `LayerStream.linear` sees every projection's input on the way,
as `codecs.importance` does for one prompt. Nothing past the last layer runs (no head).

A mask says which tokens count: llama-imatrix skips a dense product whose micro-batch has fewer
than 16 tokens, but sums every token routed to an expert (see `swtool.imatrix.collected_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from swtool.evaluate import hidden_buffer, stream_windows
from swtool.formats.base import Checkpoint
from swtool.model.forward import LayerStream


@dataclass
class InputSums:
    """One projection's input statistics (float64 accumulators, (in_features,) each)."""

    in_sum2: torch.Tensor
    in_sum: torch.Tensor
    count: int = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        self.in_sum2 += rows.pow(2).sum(dim=0)
        self.in_sum += rows.sum(dim=0)
        self.count += rows.shape[0]


class InputRecorder:
    """An InputHook summing each projection's input rows, routed experts' on every call, dense ones where `keep` says.

    `stream_windows` runs the windows through each layer in consecutive parts of `batch`
    windows, calling every dense projection once per part, so the k-th call for a
    (layer, role) holds windows [k * batch, (k + 1) * batch): that is how a call finds its rows of `keep`.
    """

    def __init__(self, keep: torch.Tensor | None, batch: int):
        self.keep = keep
        self.batch = batch
        self.sums: dict[tuple[int, str], InputSums] = {}
        self._calls: dict[tuple[int, str], int] = {}

    def __call__(self, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        key = (layer, role)
        if self.keep is not None and "." not in role:  # a dense product (routed experts' roles are "gate.3"...)
            part = self._calls.get(key, 0)
            self._calls[key] = part + 1
            mask = self.keep[part * self.batch : (part + 1) * self.batch].reshape(-1).to(rows.device)
            if mask.numel() != rows.shape[0]:
                raise RuntimeError(f"input of {role} in layer {layer} has {rows.shape[0]} rows, the token mask {mask.numel()}")
            rows = rows[mask]
        sums = self.sums.get(key)
        if sums is None:
            zeros = torch.zeros(rows.shape[-1], dtype=torch.float64, device=rows.device)
            sums = self.sums[key] = InputSums(zeros, zeros.clone())
        sums.add(rows)
        return x


def input_sums(
    checkpoint: Checkpoint,
    windows: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    batch: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    memory_limit: int = 8 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, InputSums]:
    """Canonical tensor name -> input sums of that projection over `windows` (count, ctx), `batch` windows at a time.

    `keep` (count, ctx) bool: the tokens dense projections count (all when None). Projections
    that saw no token (an expert no token was routed to) have no entry.
    """
    recorder = InputRecorder(keep, batch)
    stream = LayerStream(checkpoint, dtype=dtype, device=device, input_hook=recorder)
    with torch.no_grad(), hidden_buffer((*windows.shape, checkpoint.config.hidden_size), memory_limit) as hidden:
        stream_windows(stream, windows, hidden, batch, progress=progress)
    if progress:
        progress(stream.config.num_layers + 1, stream.config.num_layers + 1)
    out = {}
    for (layer, role), sums in recorder.sums.items():
        name = stream.family.layer_tensors(stream.config, layer)[role]
        out[name] = InputSums(sums.in_sum2.cpu(), sums.in_sum.cpu(), sums.count)
    return out
