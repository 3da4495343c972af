"""Write any readable checkpoint as a plain Hugging Face directory (config.json, safetensors, tokenizer.json).

This is how GGUF-only models join the rest of the ecosystem: tensors are
streamed one at a time under their canonical names, dequantized, un-permuted
(llama, olmo), un-offset (Gemma's 1 + w) and split per expert (Mixtral) by the
reader, and cast to the requested dtype. config.json names the family's
transformers class and spells out every switch swtool's forward reads, so that
transformers computes the model swtool computes from the GGUF.
"""

from __future__ import annotations

import dataclasses
import shutil
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swtool.errors import SwtoolError
from swtool.families import family_of
from swtool.families.config import ModelConfig
from swtool.families.rope import llama3_rope_factors
from swtool.formats.base import STORAGE_OF, Checkpoint
from swtool.formats.hf.writer import PlannedTensor, ShardedWriter

HF_CLASSES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo": ("olmo", "OlmoForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
}
"""swtool family (or a model_type of its own, Mistral) -> transformers' model_type and model class."""


def f32(value: float | None) -> float | None:
    """A float32 value read from GGUF as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return None if value is None else float(str(np.float32(value)))


def hf_config(config: ModelConfig, bos: int | None = None, eos: int | None = None, pad: int | None = None, attention_bias: bool = False) -> dict[str, Any]:
    """A transformers config.json describing `config`, in the v4 spelling (`rope_theta`, `rope_scaling`)
    that transformers v5 converts on loading; every switch swtool's forward reads for the family is written
    out, so transformers' defaults (which differ between versions) never decide."""
    family = family_of(config)
    model_type, architecture = HF_CLASSES["mistral" if config.model_type == "mistral" else family.name]
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": f32(config.norm_eps),
        "rope_theta": f32(config.rope_theta),
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if family.activation == "gelu_tanh" else "silu",
        "attention_bias": attention_bias,
        "sliding_window": config.sliding_window,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    if family.activation == "gelu_tanh":
        out["hidden_activation"] = out["hidden_act"]  # Gemma's own key
    if family.name == "llama":
        out["mlp_bias"] = False
    if family.name == "qwen2":  # the window applies from max_window_layers on, when enabled
        first = config.sliding_layers.index(True) if True in config.sliding_layers else 0
        out.update(use_sliding_window=bool(config.sliding_window), max_window_layers=first if config.sliding_window else config.num_layers)
    if family.name == "phi3":
        out["partial_rotary_factor"] = (config.rotary_dim or config.head_dim) / config.head_dim
        out["original_max_position_embeddings"] = int(config.extra.get("rope.scaling.original_context_length") or config.extra.get("original_max_position_embeddings") or config.max_position_embeddings)
    if family.name == "olmo":
        del out["rms_norm_eps"]  # a LayerNorm without parameters at a fixed epsilon
        out["clip_qkv"] = f32(config.clip_qkv)
    if family.name in ("gemma2", "gemma3"):
        scale = config.query_scale if config.query_scale is not None else config.head_dim**-0.5
        scalar = scale**-2
        out["query_pre_attn_scalar"] = round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-6) else scalar  # transformers wants an int
        out["attn_logit_softcapping"] = f32(config.attn_softcap)
        out["final_logit_softcapping"] = f32(config.final_softcap)
        if config.sliding_window:
            sliding = config.sliding_layers or (True,) * config.num_layers
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if family.name == "gemma3":
        out["rope_local_base_freq"] = f32(config.local_rope_theta if config.local_rope_theta is not None else config.rope_theta)
    if config.num_experts:
        out.update(num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token)
    return out


def llama3_scaling(factors: torch.Tensor, config: ModelConfig) -> dict[str, Any] | None:
    """The llama3 `rope_scaling` whose frequencies are exactly the GGUF's `rope_freqs` divisors.

    llama.cpp's converter keeps only the divisors (1 for high frequencies, `factor` for low ones,
    1 / ((1 - s) / factor + s) between, s linear in 1 / wavelength); the parameters are recovered from
    them. Only the ratios original_max_position_embeddings / low_freq_factor and / high_freq_factor
    matter, so low_freq_factor is set to 1 (as Llama 3.x has it) and the others follow; where no
    divisor lies between the two regimes, the thresholds are placed inside the gap. The result is
    checked by recomputing the divisors, and refused if they differ.
    """

    r = factors.double()
    if float((r - 1).abs().max()) < 1e-6:
        return None
    dim = config.rotary_dim or config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / inv
    factor = float(r.max())
    high = r <= 1 + 1e-6
    low = r >= factor * (1 - 1e-6)
    middle = ~high & ~low
    smooth = (1 / r - 1 / factor) / (1 - 1 / factor)  # s per frequency, from r = 1 / ((1 - s) / factor + s)
    x = 1 / wavelen
    if int(middle.sum()) >= 2:  # s = a x + b with a = old / (high - low), b = -low / (high - low)
        i, j = [int(k) for k in middle.nonzero()[[0, -1], 0]]
        a = float((smooth[j] - smooth[i]) / (x[j] - x[i]))
        b = float(smooth[i] - a * x[i])
    else:
        short_end = float(wavelen[high].max()) if bool(high.any()) else float(wavelen.min()) / 2
        long_end = float(wavelen[low].min()) if bool(low.any()) else float(wavelen.max()) * 2
        if bool(middle.any()):  # one divisor between: s = 0 inside the gap after it, and s = its own value there
            k = int(middle.nonzero()[0, 0])
            t_low = math.sqrt(float(wavelen[k]) * long_end)
            a = float(smooth[k]) / (float(x[k]) - 1 / t_low)
        else:  # none between: s falls from 1 to 0 inside the gap
            t_high, t_low = short_end ** (2 / 3) * long_end ** (1 / 3), short_end ** (1 / 3) * long_end ** (2 / 3)
            a = 1 / (1 / t_high - 1 / t_low)
        b = -a / t_low
    if b >= 0 or a <= 0:
        raise SwtoolError("rope_freqs.weight does not follow llama3 RoPE scaling; it cannot be written as an HF rope_scaling")
    fitted = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 1 - 1 / b, "original_max_position_embeddings": -a / b}
    rounded = {**fitted, "high_freq_factor": round(fitted["high_freq_factor"], 3), "original_max_position_embeddings": round(fitted["original_max_position_embeddings"])}
    for scaling in (rounded, fitted):  # the round values a config would hold (8192, 4.0) where they give the same divisors
        if torch.allclose(llama3_rope_factors(dataclasses.replace(config, rope_scaling=scaling)).double(), r, rtol=1e-5, atol=0):
            return scaling
    raise SwtoolError("rope_freqs.weight does not follow llama3 RoPE scaling; it cannot be written as an HF rope_scaling")


def exported_names(checkpoint: Checkpoint) -> list[str]:
    """Canonical names to write: everything HF-named (GGUF-only helpers such as rope_freqs are folded into config)."""
    return [n for n in checkpoint.names() if n.startswith(("model.", "lm_head."))]


def write_weights(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype, max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None) -> None:
    """Stream every HF-named tensor of `checkpoint`, cast to `dtype`, into safetensors shards in `directory`."""
    names = exported_names(checkpoint)
    plan = [PlannedTensor(n, STORAGE_OF[dtype].name, checkpoint.shape(n)) for n in names]
    with ShardedWriter(directory, plan, {"format": "pt", **(metadata or {})}, max_shard_bytes) as writer:
        for name in names:
            writer.write(name, checkpoint.load(name, torch.float32).to(dtype))


def config_json(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json to write; raises before anything is written for what it cannot describe."""
    meta = checkpoint.meta
    config = checkpoint.config
    if checkpoint.has("rope_freqs.weight"):  # llama.cpp keeps llama3 scaling only as per-frequency divisors
        config = dataclasses.replace(config, rope_scaling=llama3_scaling(checkpoint.load("rope_freqs.weight"), config))
    family = family_of(config)
    bias = family.config_biases and checkpoint.has(family.layer_tensors(config, 0)["q"].replace(".weight", ".bias"))
    out = hf_config(
        config,
        bos=meta.get("tokenizer.ggml.bos_token_id"),
        eos=meta.get("tokenizer.ggml.eos_token_id"),
        pad=meta.get("tokenizer.ggml.padding_token_id"),
        attention_bias=bias,
    )
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def write_model_files(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype, config: dict[str, Any] | None = None) -> None:
    """config.json (built from the parsed config), tokenizer.json and a tokenizer_config.json."""
    config = config or config_json(checkpoint, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer.json").write_text(checkpoint.tokenizer_json())
    tokenizer_config = gguf_tokenizer_config(checkpoint.meta)
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


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from an HF source (and from a quantized directory when dequantizing)."""


def copy_model_files(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype) -> None:
    """config.json and tokenizer files: copied from an HF directory, produced from GGUF metadata otherwise."""
    if checkpoint.path.is_dir():
        for name in MODEL_FILES:
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, directory / name)
        drop_quantization_config(directory / "config.json")
    else:
        write_model_files(checkpoint, directory, dtype)


def drop_quantization_config(path: Path) -> None:
    """Remove a copied config.json's quantization_config: the tensors written beside it are never the ones it
    describes (a compressed-tensors source re-quantized or dequantized; a writer adds its own afterwards)."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")
