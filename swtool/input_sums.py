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

from swtool.model.windows import hidden_buffer, stream_windows
from swtool.formats.base import Checkpoint
from swtool.model.forward import LayerStream


@dataclass
class InputSums:
    """One projection's input statistics (float64 accumulators, (in_features,) each)."""

    in_sum2: torch.Tensor
    in_sum: torch.Tensor
    count: int = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add `rows` (tokens, in_features): summed per call in float32 (pairwise: closer to exact than
        llama.cpp's running float32 sums), then into float64 totals."""
        self.in_sum2 += (rows * rows).sum(dim=0).double()
        self.in_sum += rows.sum(dim=0).double()
        self.count += rows.shape[0]


class InputRecorder:
    """An InputHook summing each projection's input rows, routed experts' on every call, dense ones where `keep` says.

    `stream_windows` runs the windows through each layer in consecutive parts of `batch`
    windows, calling every dense projection once per part, so the k-th call for a
    (layer, role) holds windows [k * batch, (k + 1) * batch): that is how a call finds its rows of `keep`.

    The accumulators of every (layer, role) in `widths` are views of one buffer allocated up
    front: small tensors born between the forward's large temporaries and kept to the end pin
    glibc's heap, which then grew by ~40 MB a layer on SmolLM2 (in about half the runs).
    """

    def __init__(self, keep: torch.Tensor | None, batch: int, widths: dict[tuple[int, str], int], device: str | torch.device = "cpu"):
        self.keep = keep
        self.batch = batch
        buffer = torch.zeros(2, sum(widths.values()), dtype=torch.float64, device=device)
        self.sums: dict[tuple[int, str], InputSums] = {}
        start = 0
        for key, width in widths.items():
            self.sums[key] = InputSums(buffer[0, start : start + width], buffer[1, start : start + width])
            start += width
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
        self.sums[key].add(rows)
        return x


def linear_widths(stream: LayerStream) -> dict[tuple[int, str], int]:
    """(layer, role) -> in_features of every matrix the forward multiplies by (norms and biases are vectors)."""
    shapes = stream.family.layer_shapes(stream.config)
    return {
        (layer, role): shapes[role][1]
        for layer in stream.layers()
        for role in stream.family.layer_tensors(stream.config, layer)
        if len(shapes[role]) == 2
    }


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
    stream = LayerStream(checkpoint, dtype=dtype, device=device)
    recorder = stream.input_hook = InputRecorder(keep, batch, linear_widths(stream), device)
    with torch.no_grad(), hidden_buffer((*windows.shape, checkpoint.config.hidden_size), memory_limit) as hidden:
        stream_windows(stream, windows, hidden, batch, progress=progress)
    if progress:
        progress(stream.config.num_layers + 1, stream.config.num_layers + 1)
    out = {}
    for (layer, role), sums in recorder.sums.items():
        if not sums.count:
            continue
        name = stream.family.layer_tensors(stream.config, layer)[role]
        out[name] = InputSums(sums.in_sum2.cpu(), sums.in_sum.cpu(), sums.count)
    return out
