"""Model families as data: what each one's layers hold and which switches the forward flips.

A family is a small frozen description, not a subclass: the forward in
`swtool.model.forward` reads these fields and nothing else differs between families.
Tensor names are canonical Hugging Face names; readers of other formats map
their own names onto these.

Roles (the keys of `layer_tensors`) the forward knows:

- norms: `attn_norm` (before attention), `post_attn_norm` (on the attention
  output), `mlp_norm` (before the MLP), `post_mlp_norm` (on the MLP output),
  `q_norm` / `k_norm` (on queries and keys);
- attention: `q`, `k`, `v` (or one fused `qkv`), `o`, and `q_bias`... for biases;
- dense MLP: `gate`, `up` (or one fused `gate_up`), `down`;
- routed experts: `router`, and `gate.E`, `up.E`, `down.E` for expert E.

A role a family does not have is simply absent, so which norms exist is data
too (OLMo's LayerNorm has no weight at all; OLMo-2 has no pre-norms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swtool.errors import SwtoolError
from swtool.families.config import ModelConfig

LAYER_PREFIX = "model.layers.{layer}."

LLAMA_ATTENTION = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
}
DENSE_MLP = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
PRE_NORMS = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
SANDWICH_NORMS = {
    "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}
QK_NORMS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
QKV_BIASES = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias"}
ALL_ATTENTION_BIASES = {**QKV_BIASES, "o_bias": "self_attn.o_proj.bias"}
EXPERTS = {
    "router": "block_sparse_moe.gate.weight",
    "gate.{expert}": "block_sparse_moe.experts.{expert}.w1.weight",
    "up.{expert}": "block_sparse_moe.experts.{expert}.w3.weight",
    "down.{expert}": "block_sparse_moe.experts.{expert}.w2.weight",
}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    """HF `model_type` values (and GGUF `general.architecture` values) served by this family."""
    gguf_arch: str | None
    """llama.cpp's architecture name, or None where llama.cpp has none."""
    tensors: dict[str, str] = field(default_factory=lambda: {**PRE_NORMS, **LLAMA_ATTENTION, **DENSE_MLP}, hash=False)
    """Role -> name template below `model.layers.N.` ({expert} expands per routed expert)."""
    gguf_permute_qk: bool = False
    """llama.cpp's converter permutes Q/K rows for interleaved RoPE in this architecture."""
    gguf_norm_offset: float = 0.0
    """llama.cpp's converter stores every norm weight plus this (Gemma's 1 + w), which readers subtract."""
    norm: str = "rms"
    """"rms"; "rms1p" (RMSNorm scaled by 1 + w, Gemma); "layer" (LayerNorm without weight or bias, OLMo)."""
    pre_norm: bool = True
    """Normalise the residual stream before attention and MLP (OLMo-2 normalises only their outputs)."""
    qk_norm: str | None = None
    """None; "head" (per head over head_dim: Qwen3, Gemma-3); "full" (over the whole projection: OLMo-2)."""
    activation: str = "silu"
    """"silu" or "gelu_tanh" (GeGLU)."""
    embed_scale: bool = False
    """Multiply embeddings by sqrt(hidden_size) (Gemma)."""
    config_biases: bool = False
    """The config's `attention_bias` adds q/k/v/o biases (Llama, Mistral, OLMo)."""

    def layer_tensors(self, config: ModelConfig, layer: int) -> dict[str, str]:
        """Role -> canonical tensor name for one decoder layer."""
        prefix = LAYER_PREFIX.format(layer=layer)
        roles = dict(self.tensors)
        if self.config_biases and config.attention_bias:
            roles.update(ALL_ATTENTION_BIASES)
        out: dict[str, str] = {}
        for role, template in roles.items():
            if "{expert}" in role:
                for expert in range(config.num_experts):
                    out[role.format(expert=expert)] = prefix + template.format(expert=expert)
            else:
                out[role] = prefix + template
        return out

    def layer_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Role -> expected shape, to check a checkpoint against its config before running it."""
        h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
        q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {
            "attn_norm": (h,),
            "post_attn_norm": (h,),
            "mlp_norm": (h,),
            "post_mlp_norm": (h,),
            "q_norm": (d,) if self.qk_norm == "head" else (q_out,),
            "k_norm": (d,) if self.qk_norm == "head" else (kv_out,),
            "q": (q_out, h),
            "k": (kv_out, h),
            "v": (kv_out, h),
            "qkv": (q_out + 2 * kv_out, h),
            "o": (h, q_out),
            "q_bias": (q_out,),
            "k_bias": (kv_out,),
            "v_bias": (kv_out,),
            "o_bias": (h,),
            "gate": (i, h),
            "up": (i, h),
            "gate_up": (2 * i, h),
            "down": (h, i),
            "router": (config.num_experts, h),
        }
        for expert in range(config.num_experts):
            shapes.update({f"gate.{expert}": (i, h), f"up.{expert}": (i, h), f"down.{expert}": (h, i)})
        return shapes

    def down_tensor(self, config: ModelConfig, layer: int, expert: int | None = None) -> str:
        """The down projection where super weights live: `down`, or routed expert `expert`'s."""
        return self.layer_tensors(config, layer)["down" if expert is None else f"down.{expert}"]

    def global_tensors(self, config: ModelConfig) -> dict[str, str]:
        head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
        names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": head}
        if self.norm == "layer":  # a LayerNorm without parameters has no tensor
            del names["final_norm"]
        return names


LLAMA = Family(name="llama", model_types=("llama", "mistral"), gguf_arch="llama", gguf_permute_qk=True, config_biases=True)
QWEN2 = Family(name="qwen2", model_types=("qwen2",), gguf_arch="qwen2", tensors={**LLAMA.tensors, **QKV_BIASES})
QWEN3 = Family(name="qwen3", model_types=("qwen3",), gguf_arch="qwen3", tensors={**LLAMA.tensors, **QK_NORMS}, qk_norm="head")
PHI3 = Family(
    name="phi3",
    model_types=("phi3",),
    gguf_arch="phi3",
    tensors={
        **PRE_NORMS,
        "qkv": "self_attn.qkv_proj.weight",
        "o": "self_attn.o_proj.weight",
        "gate_up": "mlp.gate_up_proj.weight",
        "down": "mlp.down_proj.weight",
    },
)
OLMO = Family(
    name="olmo",
    model_types=("olmo",),
    gguf_arch="olmo",
    tensors={**LLAMA_ATTENTION, **DENSE_MLP},
    gguf_permute_qk=True,
    norm="layer",
    config_biases=True,
)
OLMO2 = Family(
    name="olmo2",
    model_types=("olmo2",),
    gguf_arch="olmo2",
    tensors={
        **LLAMA_ATTENTION,
        **QK_NORMS,
        "post_attn_norm": "post_attention_layernorm.weight",
        "post_mlp_norm": "post_feedforward_layernorm.weight",
        **DENSE_MLP,
    },
    pre_norm=False,
    qk_norm="full",
)
GEMMA_SWITCHES = {"gguf_norm_offset": 1.0, "norm": "rms1p", "activation": "gelu_tanh", "embed_scale": True}
"""What every Gemma generation shares: RMSNorm by 1 + w (stored as 1 + w by llama.cpp), GeGLU, scaled embeddings."""

GEMMA = Family(name="gemma", model_types=("gemma",), gguf_arch="gemma", **GEMMA_SWITCHES)
GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2",),
    gguf_arch="gemma2",
    tensors={**SANDWICH_NORMS, **LLAMA_ATTENTION, **DENSE_MLP},
    **GEMMA_SWITCHES,
)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    gguf_arch="gemma3",
    tensors={**SANDWICH_NORMS, **LLAMA_ATTENTION, **QK_NORMS, **DENSE_MLP},
    qk_norm="head",
    **GEMMA_SWITCHES,
)
MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    gguf_arch="llama",
    tensors={**PRE_NORMS, **LLAMA_ATTENTION, **EXPERTS},
    gguf_permute_qk=True,
)

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, QWEN3, PHI3, OLMO, OLMO2, GEMMA, GEMMA2, GEMMA3, MIXTRAL)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(config: ModelConfig) -> Family:
    """The family of a model's config (the one call for code that has a config)."""
    return family_for(config.model_type, config.num_experts)


def family_for(model_type: str, num_experts: int = 0) -> Family:
    """The family serving `model_type`; llama.cpp writes Mixtral as `llama` with experts, hence `num_experts`."""
    if model_type == "llama" and num_experts:
        return MIXTRAL
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise SwtoolError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")


def linear_roles(family: Family, config: ModelConfig) -> list[str]:
    """The roles of a layer that are projection matrices (2-D), as opposed to norms and biases."""
    shapes = family.layer_shapes(config)
    return [role for role in family.layer_tensors(config, 0) if len(shapes.get(role, ())) == 2]


def linear_layers(config: ModelConfig) -> dict[str, int]:
    """Canonical name -> layer of every projection matrix in every decoder layer."""
    family = family_of(config)
    roles = linear_roles(family, config)
    return {name: i for i in range(config.num_layers) for role, name in family.layer_tensors(config, i).items() if role in roles}
