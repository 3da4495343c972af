"""Simulated W8A8: fake-quantized weights and linear-layer inputs, with the paper's two ways to tame outliers.

Everything is computed in floating point (quantize then dequantize), as
SmoothQuant and the super weight paper do, so the forward stays the same and
only the values change:

- weights: symmetric round-to-nearest per tensor;
- activations: symmetric round-to-nearest per token (default) or with one
  scale per window ("tensor"; per window rather than per batch so results do
  not depend on the batch size), applied to the input of every linear layer
  through `LayerStream`'s input hook;
- `keep_super_act` (data-free, the paper's eq. 1): in each window the largest
  |activation| is replaced by the median of its quantization group (token row
  or window) before the group is quantized, and written back exactly
  afterwards, so one massive value no longer sets the whole group's scale;
- SmoothQuant (needs calibration data): per input channel factors
  s = max|X|^a / max|W|^(1-a) move activation range into the weights; as in
  SmoothQuant's Llama recipe they are folded into the preceding RMSNorm (q/k/v
  and gate/up inputs), so the smoothed model computes the same function before
  quantization. (Folding down_proj factors into up_proj rows is also exact, but
  it blows up up_proj's per-tensor weight range: we tried it, and SmolLM2's
  W8A8 perplexity went to thousands.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from swtool.errors import SwtoolError

SMOOTHED = {"q": ("attn_norm", ("q", "k", "v")), "gate": ("mlp_norm", ("gate", "up"))}
"""Input role whose statistics set the factors -> (where 1/s is folded, the projections that take *s)."""


def quant_levels(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise SwtoolError(f"bit width {bits} is out of range (2..16)")
    return 2 ** (bits - 1) - 1


def fake_quant(x: torch.Tensor, bits: int, dim: int | None) -> torch.Tensor:
    """Symmetric RTN along `dim` (None: one scale for the whole tensor), returned dequantized."""
    levels = quant_levels(bits)
    peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (peak / levels).clamp(min=torch.finfo(torch.float32).tiny)
    return (x / scale).round().clamp(-levels, levels) * scale


GRANULARITIES = ("token", "tensor")


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise SwtoolError(f"activation granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    return granularity


def activation_groups(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """x (B,T,C) as rows that each get one scale: a token's channels, or a whole window ("tensor")."""
    if check_granularity(granularity) == "token":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1)


def fake_quant_activations(x: torch.Tensor, bits: int, granularity: str = "token", keep_largest: bool = False) -> torch.Tensor:
    """RTN of x (B,T,C) per token or per window; with `keep_largest`, eq. 1 of the paper.

    Each window's largest |value| is replaced by the median of its quantization
    group before the group is quantized, and written back exactly afterwards.
    """
    groups = activation_groups(x, granularity)
    if not keep_largest:
        return fake_quant(groups, bits, dim=-1).view_as(x)
    batch, length, channels = x.shape
    windows = torch.arange(batch, device=x.device)
    where = x.reshape(batch, -1).abs().argmax(dim=1)
    kept = x.reshape(batch, -1)[windows, where]
    group = windows * length + where // channels if granularity == "token" else windows
    held = groups.clone()
    held.view(batch, -1)[windows, where] = groups[group].median(dim=-1).values
    quantized = fake_quant(held, bits, dim=-1)
    quantized.view(batch, -1)[windows, where] = kept
    return quantized.view_as(x)


class ActivationQuantizer:
    """An input hook for `LayerStream`: fake-quantize every linear input."""

    def __init__(self, bits: int, granularity: str = "token", keep_super_act: bool = False):
        self.bits = bits
        self.granularity = check_granularity(granularity)
        self.keep_super_act = keep_super_act

    def __call__(self, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activations(x, self.bits, self.granularity, self.keep_super_act)


def quantize_weights(weights: dict[str, torch.Tensor], roles: Iterable[str], bits: int) -> dict[str, torch.Tensor]:
    """The layer's projection weights fake-quantized per tensor; norms untouched."""
    roles = set(roles)
    return {role: fake_quant(w, bits, dim=None) if role in roles else w for role, w in weights.items()}


class InputMaxima:
    """An input hook that records max |x| per input channel of each smoothed linear layer (calibration)."""

    def __init__(self) -> None:
        self.maxima: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        if role in SMOOTHED:
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            key = (layer, role)
            self.maxima[key] = torch.maximum(self.maxima[key], peak) if key in self.maxima else peak
        return x


def smooth(weights: dict[str, torch.Tensor], maxima: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """One layer's weights with SmoothQuant factors folded in (same function before quantization)."""
    out = dict(weights)
    for role, (fold_into, targets) in SMOOTHED.items():
        if role not in maxima:
            continue
        act = maxima[role].to(out[targets[0]].device, torch.float32)
        wmax = torch.stack([out[t].abs().float().amax(dim=0) for t in targets]).amax(dim=0)
        s = (act.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        for t in targets:
            out[t] = (out[t].float() * s).to(out[t].dtype)
        out[fold_into] = (out[fold_into].float() / s).to(out[fold_into].dtype)
    return out
