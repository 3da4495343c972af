"""Convert a tiny HF model directory to GGUF the way llama.cpp's converter does (F32 tensors).

Follows llama.cpp's `conversion/` modules for what they change: tensor names
from gguf-py's TensorNameMap, Q/K rows permuted for interleaved RoPE in the
llama and olmo architectures (`LlamaModel.permute`), Gemma's norm weights
stored as 1 + w, Mixtral's experts merged into one 3D tensor per projection
and written under the `llama` architecture, no `output.weight` when the
embeddings are tied; metadata under `{arch}.*`, and a byte-level `gpt2`
tokenizer under `tokenizer.ggml.*`. Test-only: swtool never writes this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from tests.helpers.tiny import BYTE_MERGE, byte_alphabet, byte_tokens

ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "olmo": "olmo", "olmo2": "olmo2", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
PERMUTED = ("llama", "olmo")


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's half-split RoPE rows -> interleaved pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def tensor_names(arch: str, layers: int) -> Callable[[str], str]:
    """HF tensor name -> GGUF tensor name for `arch`, by gguf-py's TensorNameMap (as llama.cpp's converter maps them)."""
    name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), layers)

    def gguf_name(hf_name: str) -> str:
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"gguf-py maps no {arch} tensor to {hf_name}")
        return name

    return gguf_name


def convert(directory: Path, out: Path, name: str = "tiny", bos: int | None = None) -> None:
    """Write the HF directory `directory` (a tiny model of tests/helpers/tiny.py) as the GGUF `out`.

    `bos`: a spare id made the CONTROL token llama.cpp adds at the start of every text (none by default)."""
    cfg = json.loads((directory / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = ARCH[model_type]
    tensors = load_file(directory / "model.safetensors")
    layers = cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    vocab = cfg["vocab_size"]

    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if model_type == "olmo":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("clip_qkv") is not None:
        writer.add_clamp_kqv(cfg["clip_qkv"])
    if cfg.get("num_local_experts"):
        writer.add_expert_count(cfg["num_local_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("sliding_window") and model_type in ("gemma2", "gemma3_text"):  # not for Mistral: llama.cpp's llama arch has none
        writer.add_sliding_window(cfg["sliding_window"])
    if cfg.get("layer_types") and model_type == "gemma3_text":
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    if cfg.get("attn_logit_softcapping") and model_type == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])

    token_vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    bytes_only = byte_alphabet()
    if sorted(token_vocab, key=token_vocab.get) != bytes_only:
        raise ValueError(f"{directory}: convert() handles tiny.write_tokenizer's byte-level vocabulary only")
    tokens = byte_tokens(vocab)
    # llama.cpp refuses a BPE vocabulary without merges; one merge of the bytes 0x00 0x01 (never
    # adjacent in test text) into the first spare id keeps tokenization byte by byte.
    tokens[len(bytes_only)] = "".join(BYTE_MERGE)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.NORMAL] * (len(bytes_only) + 1) + [gguf.TokenType.UNUSED] * (vocab - len(bytes_only) - 1)
    if bos is not None:
        types[bos] = gguf.TokenType.CONTROL
        writer.add_bos_token_id(bos)
        writer.add_add_bos_token(True)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(BYTE_MERGE)])

    gguf_name = tensor_names(arch, layers)
    experts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for hf_name, data in tensors.items():
        if hf_name == "lm_head.weight" and (cfg.get("tie_word_embeddings") or model_type.startswith("gemma")):
            continue
        if arch in PERMUTED and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, heads)
        if arch in PERMUTED and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, kv_heads)
        if model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        expert = re.search(r"\.experts\.(\d+)\.", hf_name)
        if expert:
            experts.setdefault(re.sub(r"\.experts\.\d+\.", ".experts.", hf_name), []).append((int(expert.group(1)), data))
            continue
        writer.add_tensor(gguf_name(hf_name), data.float().numpy())
    for merged, parts in experts.items():
        stacked = torch.stack([d for _, d in sorted(parts, key=lambda p: p[0])])
        writer.add_tensor(gguf_name(merged), stacked.float().numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
