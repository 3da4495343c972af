"""Next-token loss of hidden states, the LM head streamed in vocabulary chunks (shared by eval and scan's verification).

The full (rows x ctx x vocab) logits never exist: the head is loaded
`HEAD_CHUNK_ROWS` vocabulary rows at a time and a running log-sum-exp keeps
each position's normaliser, so memory is one chunk of the head plus at most
`LOGIT_BUDGET` logits.
"""

from __future__ import annotations

import math

import torch

from swtool.model.forward import LayerStream
from swtool.model.stream import HEAD_CHUNK_ROWS
from swtool.model.windows import batches

LOGIT_BUDGET = 1 << 25
"""Logit elements (fp32) alive at once while streaming the head: 128 MiB."""


def token_nll(stream: LayerStream, windows: torch.Tensor, hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """Next-token loss (windows, ctx-1) from the last layer's hidden states, head streamed in vocabulary chunks."""
    names = stream.family.global_tensors(stream.config)
    norm = stream.checkpoint.load(names["final_norm"], stream.dtype).to(stream.device) if "final_norm" in names else None
    for part in batches(len(windows), batch):
        hidden[part] = stream.norm(hidden[part].to(stream.device, stream.dtype), norm).float().cpu()
    count, ctx = windows.shape
    targets = windows[:, 1:].to(stream.device)
    running_max = torch.full((count, ctx - 1), -math.inf, device=stream.device)
    running_sum = torch.zeros((count, ctx - 1), device=stream.device)
    target_logit = torch.zeros((count, ctx - 1), device=stream.device)
    per_batch = max(1, LOGIT_BUDGET // (min(HEAD_CHUNK_ROWS, stream.config.vocab_size) * (ctx - 1)))
    for rows, head in stream.head_chunks(stream.dtype):
        start, stop = rows.start, rows.stop
        for part in batches(count, per_batch):
            logits = stream.softcap(torch.nn.functional.linear(hidden[part, :-1].to(stream.device, stream.dtype), head).float())
            target = targets[part]
            inside = (target >= start) & (target < stop)
            picked = logits.gather(-1, (target - start).clamp(0, stop - start - 1)[..., None]).squeeze(-1)
            target_logit[part] = torch.where(inside, picked, target_logit[part])
            peak = torch.maximum(running_max[part], logits.amax(dim=-1))
            # exp(logits - peak) in place, and these logits freed before the next ones are computed
            # (as the chunk of the head before the next loads): the budget is all the logits alive
            running_sum[part] = running_sum[part] * torch.exp(running_max[part] - peak) + logits.sub_(peak[..., None]).exp_().sum(dim=-1)
            running_max[part] = peak
            del logits
        del head
    return (running_max + running_sum.log() - target_logit).cpu()
