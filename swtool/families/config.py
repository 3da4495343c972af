"""A model's hyper-parameters, normalised from an HF `config.json` or GGUF metadata.

The forward reads only this dataclass, so the two checkpoint formats (and the
many spellings of the same field across transformers versions) meet here once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from swtool.errors import SwtoolError


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    """Which layers use `sliding_window`; empty means every layer does (when a window is set)."""
    local_rope_theta: float | None = None
    """RoPE base of the sliding-window layers where it differs (Gemma-3's local layers)."""
    rotary_dim: int = 0
    """Leading dimensions of each head that RoPE rotates (partial rotary); 0 means all of head_dim."""
    attention_bias: bool = False
    query_scale: float | None = None
    """Multiplier of attention scores; None means head_dim ** -0.5 (Gemma's query_pre_attn_scalar ** -0.5)."""
    attn_softcap: float | None = None
    """Attention logits become cap * tanh(logits / cap) (Gemma-2)."""
    final_softcap: float | None = None
    """Final logits become cap * tanh(logits / cap) (Gemma-2, Gemma-3)."""
    clip_qkv: float | None = None
    """Queries, keys and values are clamped to [-clip, clip] (OLMo)."""
    num_experts: int = 0
    experts_per_token: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific options (biases, soft-caps, expert counts...) read by the forward."""

    def validate(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise SwtoolError(f"config: {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise SwtoolError(
                f"config: num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise SwtoolError(f"config: {len(self.sliding_layers)} sliding-window layer flags for {self.num_layers} layers")
        if not 0 <= self.num_experts <= MAX_EXPERTS:  # per-layer name tables are built from it
            raise SwtoolError(f"config: {self.num_experts} experts is not between 0 and {MAX_EXPERTS}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise SwtoolError(f"config: num_experts_per_tok ({self.experts_per_token}) must be between 1 and num_local_experts ({self.num_experts})")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise SwtoolError(f"config: partial rotary dimension {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if not (math.isfinite(self.norm_eps) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise SwtoolError("config: rms_norm_eps and rope_theta must be finite, rope_theta positive")


def _require(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise SwtoolError(f"config.json: missing key {keys[0]!r}")


def _hf_rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """RoPE parameters of the global layers, and the RoPE base of sliding-window layers if it differs.

    transformers v5 writes `rope_parameters` (per layer type for Gemma-3); v4
    wrote `rope_theta`, `rope_scaling` and Gemma-3's `rope_local_base_freq`.
    """
    params = dict(cfg.get("rope_parameters") or {})
    local = cfg.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise SwtoolError("config.json: scaled RoPE on sliding-window layers is not supported")
        local = sliding.get("rope_theta", local)
        params = dict(params.get("full_attention") or {})
    legacy = cfg.get("rope_scaling") or {}
    params.update({k: v for k, v in legacy.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if params.get("rope_type") == "su":  # early Phi-3 configs' name for LongRoPE
        params["rope_type"] = "longrope"
    return params, float(local) if local is not None else None


def _hf_sliding_layers(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[bool, ...]:
    """Per layer, whether the sliding window applies: `layer_types`, or the pattern older configs implied."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return tuple(t == "sliding_attention" for t in types)
    if model_type == "gemma2":
        return tuple(i % 2 == 0 for i in range(num_layers))
    if model_type in ("gemma3_text", "gemma3"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return tuple((i + 1) % pattern != 0 for i in range(num_layers))
    if model_type == "qwen2" and cfg.get("max_window_layers") is not None:
        return tuple(i >= int(cfg["max_window_layers"]) for i in range(num_layers))
    return ()


@contextmanager
def _malformed(source: str) -> Iterator[None]:
    """A value of the wrong type anywhere in a config (a string for a width, a list for a dict) is the user's error."""
    try:
        yield
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError, KeyError) as exc:
        raise SwtoolError(f"{source}: malformed value ({exc.__class__.__name__}: {exc})") from None


MAX_LAYERS = 10_000
"""Far beyond any real model (the largest have ~130 layers); per-layer tables are built from the layer
count before any tensor is seen, so a hostile config must not make them billions long."""


MAX_EXPERTS = 4096
"""Far beyond any real MoE (hundreds of experts): bounds the per-layer name tables a hostile config could ask for."""


def _layer_count(value: Any, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_LAYERS:
        raise SwtoolError(f"{source}: layer count {value!r} is not an integer between 1 and {MAX_LAYERS}")
    return value


def _require_int(cfg: dict[str, Any], key: str) -> int:
    value = _require(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SwtoolError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build from a transformers `config.json` (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
    with _malformed("config.json"):
        return _from_hf(cfg)


def _from_hf(cfg: dict[str, Any]) -> ModelConfig:
    if not isinstance(cfg, dict):
        raise SwtoolError("config.json: not a JSON object")
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = _require(cfg, "model_type")
    hidden = _require_int(cfg, "hidden_size")
    heads = _require_int(cfg, "num_attention_heads")
    global_rope, local_rope = _hf_rope(cfg)
    theta = global_rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    partial = float(global_rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0)
    scaling = global_rope if global_rope.get("rope_type", "default") != "default" else None
    if scaling and cfg.get("original_max_position_embeddings"):  # v4 Phi-3 configs keep it outside rope_scaling
        scaling.setdefault("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    head_dim = cfg.get("head_dim") or hidden // heads
    num_layers = _layer_count(_require(cfg, "num_hidden_layers"), "config.json")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    scalar = cfg.get("query_pre_attn_scalar")
    config = ModelConfig(
        model_type=str(model_type),
        hidden_size=hidden,
        intermediate_size=_require(cfg, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=_require(cfg, "vocab_size"),
        norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_eps") or 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        sliding_window=window,
        sliding_layers=_hf_sliding_layers(cfg, str(model_type), num_layers) if window else (),
        local_rope_theta=local_rope,
        rotary_dim=int(head_dim * partial),
        attention_bias=bool(cfg.get("attention_bias", False)),
        query_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=cfg.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=cfg.get("final_logit_softcapping"),
        clip_qkv=cfg.get("clip_qkv"),
        num_experts=int(cfg.get("num_local_experts") or 0),
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
        name=str(cfg.get("_name_or_path") or ""),
        extra={k: v for k, v in cfg.items() if not isinstance(v, (dict, list)) or k in ("layer_types",)},
    )
    config.validate()
    return config


GGUF_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
"""llama.cpp's default sliding-window layer pattern per architecture (layer i slides when i % n < n - 1)."""
GGUF_LOCAL_ROPE_BASE = {"gemma3": 10000.0}
"""llama.cpp's default RoPE base of sliding-window layers where it differs from the global one."""


def _gguf_sliding_layers(meta: dict[str, Any], arch: str, num_layers: int) -> tuple[bool, ...]:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", GGUF_SWA_PATTERN.get(arch))
    if isinstance(pattern, list):
        return tuple(bool(p) for p in pattern)
    if pattern:
        return tuple(i % int(pattern) < int(pattern) - 1 for i in range(num_layers))
    return ()


def gguf_query_scale(arch: str, hidden: int, heads: int, num_layers: int) -> float | None:
    """llama.cpp's Gemma-2/3 query scale: 1/sqrt(hidden/heads) for the 27B models (by layer count), else the default."""
    if (arch, num_layers) in (("gemma2", 46), ("gemma3", 62)):
        return (hidden / heads) ** -0.5
    return None


def from_gguf(meta: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> ModelConfig:
    """Build from GGUF key/values (`{arch}.block_count`, ...) as llama.cpp writes them."""
    with _malformed("GGUF metadata"):
        return _from_gguf(meta, arch, vocab_size, tied)


def _from_gguf(meta: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise SwtoolError(f"GGUF: missing metadata key {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
        if scaling_type == "yarn":
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    num_layers = _layer_count(int(get("block_count")), "GGUF metadata")
    window = meta.get(f"{arch}.attention.sliding_window") or (4096 if arch == "gemma2" else None)
    theta = float(meta.get(f"{arch}.rope.freq_base") or 10000.0)
    local_theta = meta.get(f"{arch}.rope.freq_base_swa", GGUF_LOCAL_ROPE_BASE.get(arch))
    config = ModelConfig(
        model_type=arch,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        vocab_size=vocab_size,
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or meta.get(f"{arch}.attention.layer_norm_epsilon") or 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=tied,
        max_position_embeddings=int(meta.get(f"{arch}.context_length") or 2048),
        sliding_window=window,
        sliding_layers=_gguf_sliding_layers(meta, arch, num_layers) if window else (),
        local_rope_theta=float(local_theta) if local_theta is not None else None,
        rotary_dim=int(meta.get(f"{arch}.rope.dimension_count") or head_dim),
        query_scale=gguf_query_scale(arch, hidden, heads, num_layers),
        attn_softcap=meta.get(f"{arch}.attn_logit_softcapping") if arch == "gemma2" else None,
        final_softcap=meta.get(f"{arch}.final_logit_softcapping"),
        clip_qkv=meta.get(f"{arch}.attention.clamp_kqv"),
        num_experts=int(meta.get(f"{arch}.expert_count") or 0),
        experts_per_token=int(meta.get(f"{arch}.expert_used_count") or 0),
        name=str(meta.get("general.name") or ""),
        extra={k[len(arch) + 1 :]: v for k, v in meta.items() if k.startswith(arch + ".")},
    )
    config.validate()
    return config
