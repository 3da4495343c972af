"""Perplexity verification of super weight candidates: does zeroing one weight really break the model?

The one-prompt pass of `swtool.detect` ranks candidates by how much zeroing each
moves the prompt's next-token distributions (KL). That signal is cheap but not a
verdict: over a short prompt it is dominated by the first positions, where
zeroing any weight behind a massive activation moves the attention sink. A super
weight, by the paper's definition, is one whose removal destroys the model, so
the verdict asks exactly that: the perplexity of ordinary text with the weight
zeroed, over the perplexity of the unmodified model.

One more streamed pass does it for every candidate at once. Row 0 of the batch
is the original model on one window of text; a candidate of layer L forks its
row at L from row 0's input to L (the two agree before L) and runs the rest of
the depth with its weight zeroed. The zeroed weight's output channel is
recomputed from scratch in float32 for that row (not by subtracting its
contribution from a rounded output), so it is exact in any compute dtype. The
final norm and LM head give each row's mean next-token loss with the head
streamed in vocabulary chunks; memory is two layers plus rows x window
activations, flat in depth.

The pass computes in bfloat16 when the scan computes in float32: the verdict
compares a perplexity ratio with a bar of 2, far coarser than bf16's rounding
(on SmolLM2's built-in-text window the super weight's ratio is 9.512 in float32 and
9.481 in bf16; the other candidates' move by at most 0.05), and bf16 products run
several times faster where the CPU has bf16 instructions (a 192 x 2048 by 2048 x 5632
product: 5.7x on this project's AVX512-BF16 machine). Without such instructions
bf16 may be no faster than float32; the verdict is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from swtool.data.text import builtin_text
from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint
from swtool.model.forward import LayerStream, MlpHook
from swtool.model.nll import token_nll
from swtool.model.tokenizer import load_tokenizer

Key = tuple[int, int, int, int]
"""(layer, expert or -1 for a dense MLP, row, col): one down projection weight, experts included."""
DENSE = -1

BUILTIN_WINDOW_TOKENS = 64
"""Tokens of the built-in text the verification runs (one window, capped at the model's context).
The cost is the arithmetic of (1 + candidates) x window rows through the model, so this is the
main cost knob. The built-in text was written so that its first 64 tokens separate SmolLM2's
super weight from its other candidates: zeroing the super weight multiplies their perplexity by
9.5, the strongest other candidate by 1.54 (over 128 tokens 6.8 and 1.44, for twice the cost)."""

TEXT_WINDOW_TOKENS = 128
"""The window on a user's text (`--verify-text`), which nobody checked for this: on the first 64
tokens of the fixture Wikipedia prose SmolLM2's strongest impostor reaches 1.94 (the super weight
4.16), at the bar of 2; over 128 tokens 1.63 (4.26). Under 64 tokens the first positions (the
attention sink, which any massive-activation weight moves) dominate the mean."""

MIN_WINDOW_TOKENS = 16
"""Fewer tokens would measure little more than the attention sink at the first positions."""

BUILTIN = "built-in"


def read_text(path: Path | None) -> str:
    """The verification text: the built-in one, or a user's UTF-8 file (one-line errors)."""
    if path is None:
        return builtin_text()
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SwtoolError(f"--verify-text {path}: not UTF-8 text") from None
    except OSError as exc:
        raise SwtoolError(f"--verify-text {path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None


def window(checkpoint: Checkpoint, text: str, source: str, tokens: int | None = None) -> torch.Tensor:
    """The first `tokens` tokens of `text` (1, T), capped at the model's context; a text too short to fill them is refused.

    `tokens` None: the window for the text's source (`BUILTIN_WINDOW_TOKENS` or `TEXT_WINDOW_TOKENS`)."""
    if tokens is None:
        tokens = BUILTIN_WINDOW_TOKENS if source == BUILTIN else TEXT_WINDOW_TOKENS
    if tokens < MIN_WINDOW_TOKENS:
        raise SwtoolError(f"--verify-tokens must be at least {MIN_WINDOW_TOKENS}")
    length = min(tokens, checkpoint.config.max_position_embeddings)
    ids = load_tokenizer(checkpoint).encode(text).ids
    if len(ids) < length:
        raise SwtoolError(f"--verify-text {source}: {len(ids)} tokens, fewer than the {length} of one verification window")
    return torch.tensor([ids[:length]], dtype=torch.int64)


def compute_dtype(scan_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 for a float32 scan (see the module docstring); a 16-bit scan keeps its own dtype."""
    return torch.bfloat16 if scan_dtype == torch.float32 else scan_dtype


def zeroing_hook(weights: dict[str, torch.Tensor], rows: list[Key | None]) -> MlpHook:
    """Batch row b runs with weight rows[b] zeroed (None: the original model)."""

    def hook(layer: int, x: torch.Tensor, y: torch.Tensor, expert: int | None = None, routed: torch.Tensor | None = None) -> torch.Tensor | None:
        place = (layer, DENSE if expert is None else expert)
        hits = [(b, key) for b, key in enumerate(rows) if key is not None and key[:2] == place]
        if not hits:
            return None
        down = weights["down" if expert is None else f"down.{expert}"]
        y = y.clone()
        for b, (_, _, row, col) in hits:
            kept = down[row].float().clone()
            kept[col] = 0  # unrouted tokens have x = 0, so their (unused) output stays 0
            y[b, :, row] = (x[b].float() @ kept).to(y.dtype)
        return y

    return hook


def ppl_ratios(
    checkpoint: Checkpoint,
    tokens: torch.Tensor,
    keys: list[Key],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, dict[Key, float]]:
    """Perplexity of the model on `tokens` (1, T), and for each key the perplexity with that weight alone zeroed over it."""
    stream = LayerStream(checkpoint, dtype=dtype, device=device)
    stream.expect_rows(tokens.shape[1] * (1 + len(keys)))
    h = stream.embed(tokens)
    rows: list[Key | None] = [None]
    total = stream.config.num_layers
    for layer, weights in stream.walk():
        forks = [key for key in keys if key[0] == layer]
        if forks:
            h = torch.cat([h, h[:1].expand(len(forks), -1, -1)])
            rows += forks
        h = stream.run_layer(layer, h, weights, hook=zeroing_hook(weights, rows))
        if progress:
            progress(layer + 1, total)
    hidden = h.float().cpu()
    nll = token_nll(stream, tokens.expand(len(rows), -1), hidden, batch=len(rows)).double().mean(dim=1)
    base = float(nll[0])
    return math.exp(base), {key: math.exp(float(nll[index]) - base) for index, key in enumerate(rows) if key is not None}
