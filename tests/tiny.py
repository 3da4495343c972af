"""Tiny random models built offline with transformers, and super weights planted into them.

transformers is the numerical reference here (a test dependency only).
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def build(family: str, directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random model of `family` (fp32) into `directory` with a byte-level tokenizer."""
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_cls(**{**LLAMA_KW, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so layers do something visible
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory, config.vocab_size)
    return model


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE with no merges: every byte is a token (ids < 256 < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))


def plant(model: torch.nn.Module, directory: Path, weights: list[tuple[int, int, int]], value: float = 30.0, gain: float = 25.0) -> None:
    """Plant super weights: W_down[row, col] = value and amplified gate/up rows `col` so channel col carries a big input."""
    with torch.no_grad():
        for layer, row, col in weights:
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[col] *= gain
            mlp.up_proj.weight[col] *= gain
            mlp.down_proj.weight[row, col] = value
    model.save_pretrained(directory, safe_serialization=True)
