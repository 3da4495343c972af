"""Write any readable checkpoint as a plain Hugging Face directory (config.json, safetensors, tokenizer.json).

This is how GGUF-only models join the rest of the ecosystem: tensors are
streamed one at a time under their canonical names, dequantized and (for
llama) un-permuted by the reader, and cast to the requested dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from swtool.arch import family_of
from swtool.checkpoint.base import Checkpoint
from swtool.checkpoint.safetensors_out import TORCH_TO_ST, PlannedTensor, ShardedWriter
from swtool.config import ModelConfig
from swtool.errors import SwtoolError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config(config: ModelConfig, bos: int | None = None, eos: int | None = None) -> dict[str, Any]:
    """A transformers config.json describing `config` (transformers v4 and v5 both read it)."""
    if family_of(config).name != "llama":
        raise SwtoolError(f"writing a {config.model_type} model as an HF directory is not supported yet (Llama and Mistral only)")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES.get(config.model_type, "LlamaForCausalLM")],
        "model_type": config.model_type if config.model_type in ARCHITECTURES else "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling)
    if config.sliding_window:
        out["sliding_window"] = config.sliding_window
    if bos is not None:
        out["bos_token_id"] = bos
    if eos is not None:
        out["eos_token_id"] = eos
    return out


def exported_names(checkpoint: Checkpoint) -> list[str]:
    """Canonical names to write: everything HF-named (GGUF-only helpers such as rope_freqs are folded into config)."""
    return [n for n in checkpoint.names() if n.startswith(("model.", "lm_head."))]


def write_weights(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype, max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None) -> None:
    """Stream every HF-named tensor of `checkpoint`, cast to `dtype`, into safetensors shards in `directory`."""
    names = exported_names(checkpoint)
    plan = [PlannedTensor(n, TORCH_TO_ST[dtype], checkpoint.shape(n)) for n in names]
    writer = ShardedWriter(directory, plan, {"format": "pt", **(metadata or {})}, max_shard_bytes)
    for name in names:
        writer.write(name, checkpoint.load(name, torch.float32).to(dtype))
    writer.close()


def config_json(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json to write; raises before anything is written for families it cannot describe."""
    meta = getattr(checkpoint, "meta", {})
    config = hf_config(
        checkpoint.config,
        bos=meta.get("tokenizer.ggml.bos_token_id"),
        eos=meta.get("tokenizer.ggml.eos_token_id"),
    )
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def write_model_files(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype, config: dict[str, Any] | None = None) -> None:
    """config.json (built from the parsed config), tokenizer.json and a tokenizer_config.json."""
    config = config or config_json(checkpoint, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer.json").write_text(checkpoint.tokenizer_json())
    tokenizer_config = gguf_tokenizer_config(getattr(checkpoint, "meta", {}))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def gguf_tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens and chat template a GGUF carries, so transformers' tokenizer has them."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and 0 <= index < len(tokens):
            config[f"{role}_token"] = tokens[index]
    for role in ("bos", "eos"):
        if isinstance(meta.get(f"tokenizer.ggml.add_{role}_token"), bool):
            config[f"add_{role}_token"] = meta[f"tokenizer.ggml.add_{role}_token"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def export_hf(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype = torch.float16, max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None) -> None:
    """Write `checkpoint` into the (existing, empty) `directory`."""
    config = config_json(checkpoint, dtype)
    write_weights(checkpoint, directory, dtype, max_shard_bytes, metadata)
    write_model_files(checkpoint, directory, dtype, config)
