"""swtool's own minimal transformer forward, run one decoder layer at a time.

`LayerStream` loads one layer's tensors from a checkpoint, runs them on the
current hidden states and lets them go, so memory holds one layer plus the
activations. Family differences are the switches on `Family`; the maths reads
top to bottom: embed, then per layer norm -> attention -> residual -> norm ->
gated MLP -> residual, then final norm and head.

`MlpHook` sees each layer's down_proj input and output (and may change the
output): detection records spikes there, and the verification pass subtracts
one weight's contribution per batch variant there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from swtool.arch import Family, family_for
from swtool.checkpoint.base import Checkpoint
from swtool.config import ModelConfig
from swtool.errors import SwtoolError

MlpHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]
"""(layer, down_proj input (B,T,I), down_proj output (B,T,H)) -> replacement output or None."""

InputHook = Callable[[int, str, torch.Tensor], torch.Tensor]
"""(layer, role such as "q" or "down", input of that linear layer) -> the input to use (e.g. fake-quantized)."""

HEAD_CHUNK_ROWS = 8192
"""Vocabulary rows of the LM head loaded at once: bounds memory for 128k-token vocabularies."""


def inverse_frequencies(config: ModelConfig, extra_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and the attention scaling the rope type asks for."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    attention_factor = 1.0
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv, attention_factor = _yarn(config, scaling, inv)
    elif kind not in ("default", "dynamic"):
        raise SwtoolError(f"rope type {kind!r} is not supported (supported: default, linear, llama3, yarn, dynamic)")
    if extra_divisor is not None:
        inv = inv / extra_divisor.float()
    return inv, attention_factor


def _yarn(config: ModelConfig, scaling: dict, inv: torch.Tensor) -> tuple[torch.Tensor, float]:
    dim, base = config.head_dim, config.rope_theta
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """True where query i may attend key j: j <= i, and within the sliding window if any."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    return allowed


class LayerStream:
    """A checkpoint walked one layer at a time on a device, in one compute dtype."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu", input_hook: InputHook | None = None):
        self.checkpoint = checkpoint
        self.input_hook = input_hook
        self.config = checkpoint.config
        self.family: Family = family_for(self.config.model_type)
        self.dtype = dtype
        self.device = torch.device(device)
        extra = checkpoint.load("rope_freqs.weight") if checkpoint.has("rope_freqs.weight") else None
        self.inv_freq, self.attention_factor = inverse_frequencies(self.config, extra)
        self._check_globals()

    def _check_globals(self) -> None:
        names = self.family.global_tensors(self.config)
        for role, name in names.items():
            if not self.checkpoint.has(name):
                raise SwtoolError(f"{self.checkpoint.path}: tensor {name} ({role}) is missing")
        self.checkpoint.check_shape(names["embed"], (self.config.vocab_size, self.config.hidden_size))
        self.checkpoint.check_shape(names["head"], (self.config.vocab_size, self.config.hidden_size))

    def _get(self, name: str) -> torch.Tensor:
        return self.checkpoint.load(name, self.dtype).to(self.device)

    # -- pieces -----------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B,T,H) reading only the embedding rows of the tokens present."""
        unique, inverse = torch.unique(token_ids, return_inverse=True)
        if int(unique.max()) >= self.config.vocab_size or int(unique.min()) < 0:
            raise SwtoolError("token id outside the model's vocabulary (tokenizer and model disagree)")
        rows = self.checkpoint.load(self.family.global_tensors(self.config)["embed"], self.dtype, rows=unique.numpy())
        return rows.to(self.device)[inverse]

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        names = self.family.layer_tensors(self.config, layer)
        shapes = self.family.layer_shapes(self.config)
        weights = {}
        for role, name in names.items():
            if not self.checkpoint.has(name):
                raise SwtoolError(f"{self.checkpoint.path}: tensor {name} (layer {layer}) is missing")
            self.checkpoint.check_shape(name, shapes[role])
            weights[role] = self._get(name)
        return weights

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(self.device, self.dtype)
        sin = (emb.sin() * self.attention_factor).to(self.device, self.dtype)
        return cos, sin

    def linear(self, layer: int, role: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every projection goes through here, so one hook can see (and fake-quantize) every linear input."""
        if self.input_hook is not None:
            x = self.input_hook(layer, role, x)
        return F.linear(x, w[role])

    def attention(self, layer: int, x: torch.Tensor, w: dict[str, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, length, _ = x.shape
        q = self.linear(layer, "q", x, w).view(batch, length, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.linear(layer, "k", x, w).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.linear(layer, "v", x, w).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = c.num_heads // c.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.head_dim**-0.5)
        return self.linear(layer, "o", out.transpose(1, 2).reshape(batch, length, c.num_heads * c.head_dim), w)

    def mlp(self, layer: int, x: torch.Tensor, w: dict[str, torch.Tensor], hook: MlpHook | None) -> torch.Tensor:
        inner = F.silu(self.linear(layer, "gate", x, w)) * self.linear(layer, "up", x, w)
        out = self.linear(layer, "down", inner, w)
        if hook is not None:
            replaced = hook(layer, inner, out)
            if replaced is not None:
                out = replaced
        return out

    def run_layer(self, layer: int, h: torch.Tensor, weights: dict[str, torch.Tensor] | None = None, hook: MlpHook | None = None) -> torch.Tensor:
        """One decoder layer on hidden states h (B,T,H); loads the layer unless weights are given."""
        w = weights if weights is not None else self.layer_weights(layer)
        length = h.shape[1]
        rope = self.rope(length)
        mask = causal_mask(length, self.config.sliding_window, self.device)
        eps = self.config.norm_eps
        h = h + self.attention(layer, rms_norm(h, w["attn_norm"], eps), w, rope, mask)
        return h + self.mlp(layer, rms_norm(h, w["mlp_norm"], eps), w, hook)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, the head streamed in row chunks of the vocabulary."""
        names = self.family.global_tensors(self.config)
        x = rms_norm(h, self._get(names["final_norm"]), self.config.norm_eps)
        chunks = []
        for start in range(0, self.config.vocab_size, HEAD_CHUNK_ROWS):
            rows = slice(start, min(start + HEAD_CHUNK_ROWS, self.config.vocab_size))
            head = self.checkpoint.load(names["head"], self.dtype, rows=rows).to(self.device)
            chunks.append(F.linear(x, head))
        return torch.cat(chunks, dim=-1)

    def layers(self, start: int = 0) -> Sequence[int]:
        return range(start, self.config.num_layers)
