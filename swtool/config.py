"""A model's hyper-parameters, normalised from an HF `config.json` or GGUF metadata.

The forward reads only this dataclass, so the two checkpoint formats (and the
many spellings of the same field across transformers versions) meet here once.
"""

from __future__ import annotations

import math
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
        if not (math.isfinite(self.norm_eps) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise SwtoolError("config: rms_norm_eps and rope_theta must be finite, rope_theta positive")


def _require(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise SwtoolError(f"config.json: missing key {keys[0]!r}")


def from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build from a transformers `config.json` (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
    if not isinstance(cfg, dict):
        raise SwtoolError("config.json: not a JSON object")
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = _require(cfg, "model_type")
    hidden = _require(cfg, "hidden_size")
    heads = _require(cfg, "num_attention_heads")
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    head_dim = cfg.get("head_dim") or hidden // heads
    config = ModelConfig(
        model_type=str(model_type),
        hidden_size=hidden,
        intermediate_size=_require(cfg, "intermediate_size"),
        num_layers=_require(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=_require(cfg, "vocab_size"),
        norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_eps") or 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        name=str(cfg.get("_name_or_path") or ""),
        extra={k: v for k, v in cfg.items() if not isinstance(v, (dict, list)) or k in ("layer_types",)},
    )
    config.validate()
    return config


def from_gguf(meta: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> ModelConfig:
    """Build from GGUF key/values (`{arch}.block_count`, ...) as llama.cpp writes them."""

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
    config = ModelConfig(
        model_type=arch,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        vocab_size=vocab_size,
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or meta.get(f"{arch}.attention.layer_norm_epsilon") or 1e-6),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        rope_scaling=scaling,
        tie_embeddings=tied,
        max_position_embeddings=int(meta.get(f"{arch}.context_length") or 2048),
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        name=str(meta.get("general.name") or ""),
        extra={k[len(arch) + 1 :]: v for k, v in meta.items() if k.startswith(arch + ".")},
    )
    config.validate()
    return config
