"""Which tiny model of each family every family-wide check runs on (tests/helpers/tiny.py builds them).

One table per concern, so a family added to swtool is added here once and every check of that
concern runs on it: the forward against transformers (on the CPU and on CUDA), and GGUF
(converted as llama.cpp does, written by swtool, read back, exported).
"""

from __future__ import annotations

from tests.helpers.tiny import FAMILY_KW

FAMILIES = list(FAMILY_KW)
"""Every family tiny.build makes, with its default switches."""

FORWARD_CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    ("qwen3", {}),
    ("phi3", {}),
    ("olmo", {}),
    ("olmo2", {}),
    ("gemma", {}),
    ("gemma2", {}),
    ("gemma3_text", {}),
    ("mixtral", {}),
]
"""(family, overrides of tiny.build) for the forward: every family, and the switches a family's config may flip."""
FORWARD_IDS = ["llama", "llama-tied", "llama-rope-llama3", "llama-attention-bias", "mistral-sliding", "qwen2", "qwen2-sliding-upper-layers", "qwen3", "phi3-partial-rotary", "olmo-clip-qkv", "olmo2", "gemma", "gemma2", "gemma3_text", "mixtral"]

# GGUF stores no query_pre_attn_scalar: llama.cpp scales Gemma queries by head_dim (by hidden/heads for the
# 27B models), so the Gemma models converted here use query_pre_attn_scalar = head_dim.
GGUF_CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "gemma": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16},
    "mixtral": {},
}
"""Case -> overrides of tiny.build for every family GGUF can hold (Mistral is a llama file there)."""

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SCALED = {
    "llama-llama3": {"rope_parameters": LLAMA3_ROPE, "rope_scaling": LLAMA3_ROPE},
    "gemma3_text-linear": {**GGUF_CASES["gemma3_text"], "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }},
    "phi3-longrope": {**GGUF_CASES["phi3"], "max_position_embeddings": 256, "original_max_position_embeddings": 32, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32,
        "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 3.5, 6.0],
    }},
}
"""RoPE scaling llama.cpp applies its own way: llama3 through the rope_freqs tensor, linear on Gemma-3's global layers only,
Phi-3's LongRoPE through rope_factors_long/short (long ones here, where llama.cpp's context and swtool's 64-token
chunks both exceed the original 32)."""
GGUF_OPTIONS = {**GGUF_CASES, **SCALED}
WRITTEN = [*GGUF_CASES, *SCALED]
"""The cases `swtool quantize --format gguf` writes in the family checks: every GGUF case and every RoPE scaling."""


def family_of(case: str) -> str:
    """The family a case builds: `llama-tied` -> llama, `gemma3_text-linear` -> gemma3_text."""
    return case.split("-")[0]
