"""Rotary position embeddings, every variant once: frequencies from a model's config, and the rotation.

The forward rotates queries and keys with these; the GGUF writer stores llama3 scaling as the
per-frequency divisors `llama3_rope_factors` gives (llama.cpp's `rope_freqs`), and the HF export
solves those divisors back into a `rope_scaling`. Frequencies follow from hyper-parameters alone,
so this lives with the families, where the forward and the formats can both read it.
"""

from __future__ import annotations

import math

import torch

from swtool.errors import SwtoolError
from swtool.families.config import ModelConfig


def inverse_frequencies(config: ModelConfig, extra_divisor: torch.Tensor | None = None, theta: float | None = None, length: int | None = None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and the attention scaling the rope type asks for.

    `theta` gives plain (unscaled) RoPE with another base, as Gemma-3's sliding-window layers use.
    `length` is the sequence length, which picks LongRoPE's short or long factors.
    """
    dim = config.rotary_dim or config.head_dim
    base = theta if theta is not None else config.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if theta is not None:
        return inv, 1.0
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    attention_factor = 1.0
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        inv = inv / llama3_rope_factors(config)
    elif kind == "yarn":
        inv, attention_factor = _yarn(config, scaling, inv)
    elif kind == "longrope":  # Phi-3 128k / Phi-3.5: per-frequency factors, long ones past the original context
        original = float(scaling["original_max_position_embeddings"])
        factor = float(scaling.get("factor") or config.max_position_embeddings / original)
        attention_factor = scaling.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        factors = scaling["long_factor"] if length is not None and length > original else scaling["short_factor"]
        inv = inv / torch.tensor(factors, dtype=torch.float32)
    elif kind not in ("default", "dynamic"):
        raise SwtoolError(f"rope type {kind!r} is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)")
    if extra_divisor is not None:
        inv = inv / extra_divisor.float()
    return inv, attention_factor


def _yarn(config: ModelConfig, scaling: dict, inv: torch.Tensor) -> tuple[torch.Tensor, float]:
    dim, base = config.rotary_dim or config.head_dim, config.rope_theta
    factor = float(scaling["factor"])
    original = float(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
    attention_factor = scaling.get("attention_factor") or 0.1 * math.log(factor) + 1.0

    def correction(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction(beta_fast)), 0)
    high = min(math.ceil(correction(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolation = 1 - ramp
    return inv / factor * (1 - extrapolation) + inv * extrapolation, float(attention_factor)


def llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for llama3 RoPE scaling, as convert_hf_to_gguf.py computes it:
    per frequency, the divisor llama3 scaling applies (1 for high, `factor` for low frequencies, smooth between)."""
    scaling = config.rope_scaling
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the leading rotary_dim dimensions of each head (all of them unless RoPE is partial)."""
    cos, sin = rope
    dim = cos.shape[-1]
    rotated = x[..., :dim] * cos + rotate_half(x[..., :dim]) * sin
    return rotated if dim == x.shape[-1] else torch.cat((rotated, x[..., dim:]), dim=-1)
