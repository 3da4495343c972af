"""How much each input column of every linear layer matters, from the scan's one built-in prompt.

`--clip auto` picks each tensor's clipping threshold by the error it causes.
Counting every weight alike (||RTN(clip(W)) - W||^2) clips weights that read
massive activations: on SmolLM2 the largest weights of the down_proj tensors
of layers 1, 2 and 11 sit in row 507 (the super activation's channel), in
input columns whose input mean square is 165 to 1 200 times the column mean,
and least plain error clipped those tensors at about a tenth of max|w|: 4-bit
perplexity at blocks of 4096 went from 122 to 70 610 (README, quality
section). The output error ||(W' - W) x||^2 is what matters; averaged over
inputs and keeping only the diagonal of E[x x^T] it is
sum_ij (W'_ij - W_ij)^2 E[x_j^2], so each column's error is weighted by the
mean square of its input.

E[x_j^2] comes from one streamed forward pass of the original model over the
same fixed sentence `swtool scan` reads (`swtool.detect.DEFAULT_PROMPT`): no
text corpus, no user data, the same output for the same model. Massive
activations are part of how the model works rather than of what it reads
(Sun et al. 2024, "Massive activations in large language models", find them
whatever the input), so the nine tokens of that sentence show them. A small
floor (DAMPING times the column mean) keeps columns that happened to be quiet
on those tokens from counting as free to clip.
"""

from __future__ import annotations

import torch

from swtool.formats.base import Checkpoint
from swtool.model.forward import LayerStream

DAMPING = 0.01
"""Floor added to every column's mean square, as a fraction of the tensor's mean (GPTQ damps its Hessian the same way)."""


def input_importance(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Canonical tensor name -> fp32 (in_features,) weight per input column: mean square of that column's input, damped.

    Covers every projection the forward runs through `LayerStream.linear`
    (attention, MLP, routed experts that receive a token of the prompt). Tensors
    without an entry (embeddings, the LM head, experts the prompt never reaches)
    are clipped by their plain reconstruction error.
    """
    from swtool.detect import DEFAULT_PROMPT
    from swtool.model.tokenizer import encode

    squares: dict[tuple[int, str], torch.Tensor] = {}

    def record(layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        squares[(layer, role)] = x.reshape(-1, x.shape[-1]).float().pow(2).mean(dim=0)
        return x

    stream = LayerStream(checkpoint, dtype, input_hook=record)
    with torch.no_grad():
        h = stream.embed(torch.tensor([encode(checkpoint, prompt or DEFAULT_PROMPT)]))
        stream.expect_rows(h.shape[1])
        for layer, weights in stream.walk():
            h = stream.run_layer(layer, h, weights)
    out = {}
    for (layer, role), mean_square in squares.items():
        name = stream.family.layer_tensors(stream.config, layer)[role]
        out[name] = mean_square + DAMPING * mean_square.mean()
    return out
