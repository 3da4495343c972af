"""swtool's own forward over a whole checkpoint: logits, and running perplexities as llama-perplexity prints them.

Tests compare files through these (a GGUF against the HF directory it came from, swtool against llama.cpp).
"""

from __future__ import annotations

import torch

from swtool.model.forward import LayerStream


def logits(checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """Every layer of `checkpoint` on `tokens`, then the head."""
    stream = LayerStream(checkpoint)
    h = stream.embed(tokens)
    for layer in stream.layers():
        h = stream.run_layer(layer, h)
    return stream.logits(h)


def chunk_perplexities(checkpoint, ids: list[int], n_ctx: int) -> list[float]:
    """Running perplexity after each chunk, as llama-perplexity prints it: second half of each chunk, no BOS."""
    stream = LayerStream(checkpoint)
    nll, count, out = 0.0, 0, []
    for c in range(len(ids) // n_ctx):
        chunk = torch.tensor([ids[c * n_ctx : (c + 1) * n_ctx]])
        h = stream.embed(chunk)
        for layer in stream.layers():
            h = stream.run_layer(layer, h)
        logp = torch.log_softmax(stream.logits(h)[0].double(), dim=-1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= float(logp[j, chunk[0, j + 1]])
            count += 1
        out.append(float(torch.tensor(nll / count).exp()))
    return out
