"""Model families as data: what each one's layers hold and which switches the forward flips.

A family is a small frozen description, not a subclass: the forward in
`swtool.forward` reads these fields and nothing else differs between families.
Tensor names are canonical Hugging Face names; readers of other formats map
their own names onto these.
"""

from __future__ import annotations

from dataclasses import dataclass

from swtool.config import ModelConfig
from swtool.errors import SwtoolError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    """HF `model_type` values (and GGUF `general.architecture` values) served by this family."""
    gguf_arch: str | None
    """llama.cpp's architecture name, or None where llama.cpp has none."""
    gguf_permute_qk: bool = False
    """llama.cpp's converter permutes Q/K rows for interleaved RoPE in this architecture."""
    norm: str = "rms"
    activation: str = "silu"

    def layer_tensors(self, config: ModelConfig, layer: int) -> dict[str, str]:
        """Role -> canonical tensor name for one decoder layer."""
        p = f"model.layers.{layer}."
        return {
            "attn_norm": p + "input_layernorm.weight",
            "q": p + "self_attn.q_proj.weight",
            "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight",
            "mlp_norm": p + "post_attention_layernorm.weight",
            "gate": p + "mlp.gate_proj.weight",
            "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight",
        }

    def layer_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Role -> expected shape, to check a checkpoint against its config before running it."""
        h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
        return {
            "attn_norm": (h,),
            "q": (config.num_heads * d, h),
            "k": (config.num_kv_heads * d, h),
            "v": (config.num_kv_heads * d, h),
            "o": (h, config.num_heads * d),
            "mlp_norm": (h,),
            "gate": (i, h),
            "up": (i, h),
            "down": (h, i),
        }

    def global_tensors(self, config: ModelConfig) -> dict[str, str]:
        head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
        return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": head}


LLAMA = Family(name="llama", model_types=("llama", "mistral"), gguf_arch="llama", gguf_permute_qk=True)

FAMILIES: tuple[Family, ...] = (LLAMA,)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise SwtoolError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
