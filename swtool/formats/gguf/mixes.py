"""Per-tensor GGML types of llama-quantize's mixes (Q4_K_M and friends), as data.

A K-quant "mix" is not one type: llama-quantize gives the sensitive tensors
(attn_v, ffn_down in some layers, the output head) more bits and demotes rows a
type cannot take. swtool writes GGUF files that should match llama-quantize's
choice tensor for tensor, so this module restates that choice: given the mix
name, the model's GGUF tensors (name, shape, stored type) and the few model
facts llama-quantize looks at, it returns every tensor's type, the
`general.file_type` value and the fallbacks to report.

The rules follow llama.cpp b11434, src/llama-quant.cpp (`llama_tensor_get_type`,
`llama_tensor_get_type_impl`, `tensor_allows_quantization`,
`tensor_type_fallback`, `init_quantize_state_counters`), for a run without
--pure, --imatrix (unless `has_imatrix`), --output-tensor-type,
--token-embedding-type or --tensor-type. Only the mixes swtool writes are here
(no IQ*/TQ*/MXFP4 branches). When llama.cpp changes these rules, change RULES
and regenerate tests/fixtures/gguf_mix_types.json (scripts/golden/mix_types_golden.py).

Shapes are in torch order, as everywhere in swtool: (out, in) for a linear
weight, (experts, out, in) for stacked experts; the row length llama.cpp calls
ne[0] is the last entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from swtool.errors import SwtoolError

T = GGMLQuantizationType
LLAMA_CPP_VERSION = "b11434"
"""The llama.cpp release these rules restate; the golden fixture records the release that made it."""


# ---- the mixes: name -> (general.file_type, default tensor type) -------------------------------

@dataclass(frozen=True)
class Mix:
    name: str
    file_type: LlamaFileType
    """What llama-quantize stores in general.file_type (LLAMA_FTYPE_MOSTLY_*)."""
    default: GGMLQuantizationType
    """The type of every quantizable tensor that no rule moves (llama_ftype_get_default_type)."""

    @property
    def quantized(self) -> bool:
        """F32/F16/BF16 'mixes' convert every quantizable tensor and apply no rule or fallback."""
        return self.default not in (T.F32, T.F16, T.BF16)


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("Q2_K", LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
    Mix("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
    Mix("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
    Mix("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K),
    Mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K),
    Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    Mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
    Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    Mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    Mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
    Mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
    Mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
    Mix("F16", LlamaFileType.MOSTLY_F16, T.F16),
    Mix("BF16", LlamaFileType.MOSTLY_BF16, T.BF16),
    Mix("F32", LlamaFileType.ALL_F32, T.F32),
)}


ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
"""llama-quantize's own aliases (tools/quantize/quantize.cpp QUANT_OPTIONS): a bare K type names its _M mix."""


def parse_mix(name: str, option: str = "--type") -> Mix:
    """The mix for a user's spelling (any case, llama-quantize's aliases too); an unknown name lists the valid ones."""
    upper = name.upper()
    found = MIXES.get(ALIASES.get(upper, upper))
    if found is None:
        raise SwtoolError(f"{option} {name!r} is not a GGUF type or mix swtool writes; choose one of {', '.join([*MIXES, *ALIASES])}")
    return found


# ---- model facts and tensor categories ---------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters llama-quantize's rules read (GGUF keys `{arch}.block_count`, ...)."""

    arch: str
    """llama.cpp's architecture name (general.architecture)."""
    n_layer: int
    """{arch}.block_count: the layer count the ffn_down rules divide by."""
    n_head: int
    n_head_kv: int
    """With n_head: the GQA ratio n_head // n_head_kv of layer 0 (0 when n_head_kv is 0)."""
    n_expert: int = 0
    """{arch}.expert_count; 0 for a dense model."""

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, the one model size its rules look at (set by each arch's load_hparams)."""
        if self.n_layer != SEVENTY_B_LAYERS.get(self.arch):
            return False
        return self.arch != "llama" or self.n_head != self.n_head_kv  # llama's 80 layers without GQA are 65B


def model_facts(arch: str, values: Mapping[str, Any]) -> ModelFacts:
    """ModelFacts from GGUF key/values as plain Python values, read as llama.cpp's load_hparams reads them:
    a per-layer head count array counts by its first entry, a missing head_count_kv means no GQA, a missing
    expert_count a dense model."""
    def first(key: str, default: int | None = None) -> int:
        value = values.get(f"{arch}.{key}", default)
        if value is None:
            raise SwtoolError(f"GGUF metadata lacks {arch}.{key}, which llama-quantize needs to pick tensor types")
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    n_head = first("attention.head_count", 0)
    return ModelFacts(arch, first("block_count"), n_head, first("attention.head_count_kv", n_head), first("expert_count", 0))


SEVENTY_B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
"""Architectures whose load_hparams call a model of this many layers 70B (llama only when it uses GQA)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    """GGUF tensor name (blk.N.attn_v.weight)."""
    shape: tuple[int, ...]
    """Torch order; shape[-1] is the row length."""
    stored: GGMLQuantizationType = T.F32
    """The type in the input file; llama-quantize leaves tensors it does not quantize as they are."""


class Cat(Enum):
    """tensor_get_category: broad roles by name, not llama.cpp's per-arch tensor names."""

    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


CATEGORY_BY_SUBSTRING = (  # first match wins, as in llama.cpp
    ("attn_qkv.weight", Cat.ATTN_QKV),
    ("attn_kv_b.weight", Cat.ATTN_KV_B),
    ("attn_v.weight", Cat.ATTN_V),
    ("attn_k.weight", Cat.ATTN_K),
    ("attn_q.weight", Cat.ATTN_Q),
    ("attn_output.weight", Cat.ATTN_OUTPUT),
    ("ffn_up", Cat.FFN_UP),
    ("ffn_gate", Cat.FFN_GATE),
    ("ffn_down", Cat.FFN_DOWN),
)
ATTN_V_LIKE = (Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B)
"""Counted together (n_attention_wv) and treated alike: fused QKV and MLA's kv_b get attn_v's rules."""


def category(name: str) -> Cat:
    if name == "output.weight":
        return Cat.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Cat.TOKEN_EMBD
    return next((cat for part, cat in CATEGORY_BY_SUBSTRING if part in name), Cat.OTHER)


# ---- which tensors are never quantized (tensor_allows_quantization) ----------------------------

NEVER_QUANTIZED_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
"""Substrings of names llama-quantize copies unchanged: norms, MoE routers, tiny or positional tensors."""
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
GLM5_NEXT_NEVER_QUANTIZED_PARTS = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate", "indexer_compressor_ape",
    "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight", "ssm_beta.weight",
    "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last of size > 1 in ggml order, so a (1, n) weight counts as 1-D."""
    ne = list(reversed(shape))
    return next((i + 1 for i in range(len(ne) - 1, 0, -1) if ne[i] > 1), 1)


def allows_quantization(tensor: TensorSpec, arch: str) -> bool:
    """2-D and 3-D weights other than norms, routers and the small or positional tensors llama.cpp keeps."""
    name = tensor.name
    if ggml_n_dims(tensor.shape) < 2 or not name.endswith("weight") or name in NEVER_QUANTIZED_NAMES:
        return False
    parts = NEVER_QUANTIZED_PARTS + (GLM5_NEXT_NEVER_QUANTIZED_PARTS if arch == "glm5-next" else ())
    return not any(part in name for part in parts)


# ---- the rules -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class At:
    """Where a tensor sits, for a rule: its index among its kind and their count, and the model facts."""

    i: int
    """attn_v-like: the running count of attn_v-like tensors; ffn_down: the layer (parsed from the name in
    a MoE, else the running count of ffn_down tensors)."""
    n: int
    """attn_v-like: how many the model has; ffn_down: block_count."""
    model: ModelFacts

    @property
    def more_bits(self) -> bool:
        """use_more_bits: the first and last eighth of the layers and every third one between."""
        return self.i < self.n // 8 or self.i >= 7 * self.n // 8 or (self.i - self.n // 8) % 3 == 2

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"


Rule = Callable[[At], "GGMLQuantizationType | None"]
"""A rule returns the tensor's type, or None to leave the mix's default."""

MOE8_ATTN_OUTPUT_Q5_K = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
"""Mixes whose attn_output becomes Q5_K in an 8-expert model (and the IQ mixes swtool does not write)."""

# (category, mix) -> rule, in llama_tensor_get_type_impl's order for that category (b11434).
# The arch-wide overrides after these rows (70B attn_v, 8-expert attn_v/attn_k) are in `rule_type`.
RULES: dict[tuple[Cat, str], Rule] = {
    # attn_v, fused attn_qkv and attn_kv_b (i counts them in quantize_order)
    (Cat.ATTN_V, "Q2_K"): lambda at: T.Q4_K if at.model.gqa >= 4 else T.Q3_K,
    (Cat.ATTN_V, "Q3_K_M"): lambda at: T.Q5_K if at.i < 2 else T.Q4_K,
    (Cat.ATTN_V, "Q3_K_L"): lambda at: T.Q5_K,
    (Cat.ATTN_V, "Q4_K_M"): lambda at: T.Q6_K if at.more_bits else None,
    (Cat.ATTN_V, "Q5_K_M"): lambda at: T.Q6_K if at.more_bits else None,
    (Cat.ATTN_V, "Q4_K_S"): lambda at: T.Q5_K if at.i < 4 else None,
    # ffn_down (i is the layer)
    (Cat.FFN_DOWN, "Q2_K"): lambda at: T.Q3_K,
    (Cat.FFN_DOWN, "Q3_K_M"): lambda at: (
        T.Q5_K if at.i < at.n // 16 else T.Q4_K if not at.falcon or at.more_bits else T.Q3_K),
    (Cat.FFN_DOWN, "Q3_K_L"): lambda at: T.Q4_K if at.falcon else T.Q5_K,
    (Cat.FFN_DOWN, "Q4_K_M"): lambda at: (
        (T.Q6_K if at.i < at.n // 16 else T.Q5_K if at.more_bits else T.Q4_K) if at.falcon
        else T.Q6_K if at.more_bits else None),
    (Cat.FFN_DOWN, "Q5_K_M"): lambda at: T.Q6_K if at.more_bits else None,
    (Cat.FFN_DOWN, "Q4_K_S"): lambda at: T.Q5_K if not at.falcon and at.i < at.n // 8 else None,
    # attn_output (non-falcon, not 8 experts; the 8-expert and falcon cases are in `rule_type`)
    (Cat.ATTN_OUTPUT, "Q2_K"): lambda at: T.Q3_K,
    (Cat.ATTN_OUTPUT, "Q3_K_M"): lambda at: T.Q4_K,
    (Cat.ATTN_OUTPUT, "Q3_K_L"): lambda at: T.Q5_K,
}
IMATRIX_RULES: dict[tuple[Cat, str], Rule] = {
    # with an importance matrix, the first eighth of ffn_down goes from Q4_0/Q5_0 to Q4_1/Q5_1
    (Cat.FFN_DOWN, "Q4_0"): lambda at: T.Q4_1 if at.i < at.n // 8 else None,
    (Cat.FFN_DOWN, "Q5_0"): lambda at: T.Q5_1 if at.i < at.n // 8 else None,
}

FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}
"""tensor_type_fallback: a 256-block type whose row length does not fit -> a 32-block type of about the
same size; a 32-block type that does not fit (and any fallback that does not) -> F16."""


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def head_type(mix: Mix, row: int, model: ModelFacts) -> GGMLQuantizationType:
    """output.weight (or the tied token embedding): Q6_K, or Q8_0 for falcon or rows the mix's block cannot take."""
    if model.arch == "falcon" or row % block_size(mix.default) != 0:
        return T.Q8_0
    return mix.default if mix.default == T.Q8_0 else T.Q6_K


def rule_type(mix: Mix, cat: Cat, at: At, has_imatrix: bool) -> GGMLQuantizationType:
    """The mix's type for a quantizable tensor other than the head, before the row-length fallback."""
    moe8 = at.model.n_expert == 8
    if cat == Cat.ATTN_K and moe8:
        return T.Q8_0
    if cat == Cat.ATTN_OUTPUT and (moe8 or at.falcon):
        if at.falcon:
            return T.Q4_K if mix.name == "Q3_K_L" else mix.default
        return T.Q5_K if mix.name in MOE8_ATTN_OUTPUT_Q5_K else mix.default
    key = (Cat.ATTN_V if cat in ATTN_V_LIKE else cat, mix.name)
    rule = RULES.get(key) or (IMATRIX_RULES.get(key) if has_imatrix else None)
    ruled = rule(at) if rule else None
    chosen = mix.default if ruled is None else ruled
    if cat in ATTN_V_LIKE:
        if at.model.is_70b and chosen in (T.Q3_K, T.Q4_K):
            chosen = T.Q5_K  # 8 heads share attn_v: more bits for a tensor 8x smaller than attn_q
        if moe8:
            chosen = T.Q8_0
    return chosen


# ---- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fallback:
    name: str
    row: int
    wanted: GGMLQuantizationType
    got: GGMLQuantizationType

    @property
    def note(self) -> str:
        """One line for the user, saying what llama-quantize's warning says."""
        return (f"{self.name}: row length {self.row} is not a multiple of {block_size(self.wanted)} "
                f"(the {self.wanted.name} block size); written as {self.got.name}, as llama-quantize does")


@dataclass
class MixPlan:
    mix: Mix
    types: dict[str, GGMLQuantizationType]
    """Every tensor's type, in the order given."""
    fallbacks: list[Fallback] = field(default_factory=list)

    @property
    def file_type(self) -> LlamaFileType:
        return self.mix.file_type

    @property
    def notes(self) -> list[str]:
        return [f.note for f in self.fallbacks]


LAYER = re.compile(r"^blk\.(\d+)\.")


def quantize_order(names: Sequence[str]) -> list[str]:
    """The order llama-quantize visits tensors (weights_map's comparer): by layer, non-layer ones first, then by name.

    The running attn_v / ffn_down counts follow this order, not the file's."""
    def key(name: str) -> tuple[int, str]:
        found = LAYER.match(name)
        return (int(found.group(1)) if found else -1, name)
    return sorted(names, key=key)


def fit_row(name: str, row: int, wanted: GGMLQuantizationType, fallbacks: list[Fallback]) -> GGMLQuantizationType:
    """tensor_type_fallback: demote a type whose block does not divide the row length, and record it."""
    if row % block_size(wanted) == 0:
        return wanted
    got = FALLBACK.get(wanted, wanted)
    if row % block_size(got) != 0:
        got = T.F16
    fallbacks.append(Fallback(name, row, wanted, got))
    return got


def plan_mix(mix: str | Mix, tensors: Sequence[TensorSpec], model: ModelFacts, *, has_imatrix: bool = False) -> MixPlan:
    """Each tensor's type as llama-quantize would write it at this mix, plus the fallbacks it would warn about."""
    mix = mix if isinstance(mix, Mix) else parse_mix(mix)
    by_name = {t.name: t for t in tensors}
    order = quantize_order(list(by_name))
    cats = {name: category(name) for name in order}
    tied = "output.weight" not in by_name
    n_attn_v = sum(cat in ATTN_V_LIKE for cat in cats.values())
    seen_attn_v = seen_ffn_down = 0
    chosen: dict[str, GGMLQuantizationType] = {}
    fallbacks: list[Fallback] = []
    for name in order:
        tensor, cat = by_name[name], cats[name]
        if not allows_quantization(tensor, model.arch):
            chosen[name] = tensor.stored
            continue
        if not mix.quantized:
            chosen[name] = mix.default
            continue
        at = At(0, 0, model)
        if cat in ATTN_V_LIKE:
            at = At(seen_attn_v, n_attn_v, model)
            seen_attn_v += 1
        elif cat == Cat.FFN_DOWN:
            at = At(ffn_layer(name, seen_ffn_down, model), model.n_layer, model)
            seen_ffn_down += 1
        if cat == Cat.OUTPUT or (tied and cat == Cat.TOKEN_EMBD):
            wanted = head_type(mix, tensor.shape[-1], model)
        elif cat == Cat.TOKEN_EMBD:
            wanted = mix.default
        else:
            wanted = rule_type(mix, cat, at, has_imatrix)
        chosen[name] = fit_row(name, tensor.shape[-1], wanted, fallbacks)
    return MixPlan(mix, {t.name: chosen[t.name] for t in tensors}, fallbacks)


def ffn_layer(name: str, seen: int, model: ModelFacts) -> int:
    """The layer an ffn_down rule uses: parsed from the name in a MoE (experts are not in layer order in
    old Mixtral files), else how many ffn_down tensors came before."""
    if max(1, model.n_expert) == 1:
        return seen
    found = LAYER.match(name)
    if found is None or int(found.group(1)) >= model.n_layer:
        raise SwtoolError(f"{name}: cannot tell its layer (0..{model.n_layer - 1}) in a {model.n_expert}-expert model")
    return int(found.group(1))
