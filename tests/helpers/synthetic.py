"""Tiny checkpoints written byte by byte, fast and without transformers, for tests that damage them.

`llama_dir` writes a valid, random, very small llama HF directory (config.json,
model.safetensors, tokenizer.json) in milliseconds; `safetensors_bytes` and
`gguf_file` give full control over the bytes so tests can corrupt exactly one
thing at a time. What they share with the transformers-built models of tiny.py
(the byte-level tokenizer and its GGUF vocabulary, planting a super weight) and
with the test converter gguf_tiny.py (HF -> GGUF tensor names) is imported from there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.helpers.gguf_tiny import tensor_names
from tests.helpers.tiny import byte_tokens, plant_weight, text_log_frequencies, write_tokenizer

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=300,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

NP_TO_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}

EFFECT = ("--min-effect", "0.05")
"""The scan option these models need: a 16-wide model's planted super weight moves the next-token
distribution by ~0.13 nats."""


def llama_tensors(config: dict, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Random weights with the shapes `config` implies, in HF names and (out, in) layout."""
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(dtype)

    tensors = {"model.embed_tokens.weight": w(v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(h, dtype),
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "post_attention_layernorm.weight": np.ones(h, dtype),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        })
    tensors["model.norm.weight"] = np.ones(h, dtype)
    tensors["lm_head.weight"] = w(v, h)
    return tensors


def safetensors_bytes(tensors: dict[str, np.ndarray], patch: Callable[[dict], None] | None = None, metadata: dict | None = None) -> bytes:
    """A safetensors file; `patch(header)` may damage the header dict before it is encoded."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    data = b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": NP_TO_ST[array.dtype], "shape": list(array.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if patch:
        patch(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def llama_dir(directory: Path, seed: int = 0, dtype: str = "float32", tensors: dict[str, np.ndarray] | None = None, **config) -> dict[str, np.ndarray]:
    """Write a tiny random llama HF directory; returns its tensors (pass `tensors` to write altered ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**CONFIG, **config}
    tensors = tensors if tensors is not None else llama_tensors(cfg, seed, dtype)
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    write_tokenizer(directory, cfg["vocab_size"])
    return tensors


def gguf_file(path: Path, seed: int = 0, tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A valid tiny llama GGUF (F32 tensors, a byte-level vocabulary) written by gguf-py; returns its tensors by GGUF name."""
    import gguf

    cfg = CONFIG
    if tensors is None:
        gguf_name = tensor_names("llama", cfg["num_hidden_layers"])
        tensors = {gguf_name(k): v for k, v in llama_tensors(cfg, seed).items()}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_tokens(cfg["vocab_size"]))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def plant(tensors: dict[str, np.ndarray], layer: int, row: int, col: int, value: float = 30.0, gain: float = 25.0, controls: bool = False) -> None:
    """A super weight at down_proj[row, col] of `layer`, fed by amplified gate/up rows `col` (tiny.plant_weight, as tiny.plant does).

    `controls`: make it control the model's predictions, as `tiny.plant_controlling` explains
    (up row `col` = gate row `col`, and the LM head reads channel `row` as the built-in
    text's token log frequencies), so that zeroing it raises perplexity and the scan's
    verdict can call it a super weight.
    """
    p = f"model.layers.{layer}.mlp."
    plant_weight(tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"], tensors[p + "down_proj.weight"], row, col, value, gain)
    if controls:
        tensors[p + "up_proj.weight"][col] = tensors[p + "gate_proj.weight"][col]
        head = tensors["lm_head.weight"]
        head[:, row] = text_log_frequencies(head.shape[0]).numpy() / head.shape[1] ** 0.5
