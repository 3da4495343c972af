"""The `quantization_config` of a compressed-tensors checkpoint (config.json), written and read without the package.

What swtool writes (compressed-tensors 0.20.1's own serialisation of the same
QuantizationConfig, less the fields that are null by default; checked against
the package in the tests):

    "quantization_config": {
      "quant_method": "compressed-tensors", "version": "0.20.1",
      "format": "pack-quantized" (int weights) | "float-quantized" (FP8 weights),
      "quantization_status": "compressed",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
          "num_bits": 4, "type": "int" | "float", "symmetric": false,
          "group_size": 64 | null, "strategy": "group" | "channel", "dynamic": false},
        "input_activations": null, "output_activations": null, "format": null}},
      "ignore": ["lm_head", "model.layers.3.mlp.down_proj", ...],
      "kv_cache_scheme": null, "sparsity_config": {}, "transform_config": {}}

Every nn.Linear is a target; `ignore` names, as module names, every linear layer
that keeps its source dtype (the head, and the modules holding super weights).
Per quantized module NAME (the weight's name without `.weight`) the shards hold:

    pack-quantized:  NAME.weight_packed      I32  (out, ceil(in * bits / 32))   see swtool.codecs.compressed
                     NAME.weight_scale       dtype (out, groups)  ((out, 1) for channel)
                     NAME.weight_zero_point  I32  (ceil(out * bits / 32), groups)   asymmetric only
                     NAME.weight_shape       I64  [2]
    float-quantized: NAME.weight             F8_E4M3 (out, in)
                     NAME.weight_scale       dtype (out, 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from swtool.errors import SwtoolError

METHOD = "compressed-tensors"
VERSION = "0.20.1"
"""The compressed-tensors release whose layout swtool writes (the version tested against)."""
PACKED = "pack-quantized"
FLOAT = "float-quantized"
READABLE_FORMATS = (PACKED, FLOAT, "naive-quantized", "int-quantized", "mixed-precision")
"""Formats whose weights the reader rebuilds; sparse and fp4 formats are refused."""

PACKED_LEAF, SCALE_LEAF, ZERO_LEAF, SHAPE_LEAF = "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"
PARAMETER_LEAVES = (SCALE_LEAF, ZERO_LEAF, SHAPE_LEAF, "weight_global_scale", "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point", "k_scale", "v_scale", "q_scale")
"""Quantization parameters stored beside weights: read with their weight, never tensors of their own."""

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections vLLM fuses into one layer (qkv_proj, gate_up_proj): they must share one scheme, so keeping
one of them unquantized keeps its siblings unquantized too."""


@dataclass(frozen=True)
class WeightScheme:
    """The weight quantization of one config group."""

    num_bits: int
    type: str
    """"int" or "float"."""
    symmetric: bool
    strategy: str
    """"channel", "group" or "tensor"."""
    group_size: int | None = None

    def to_json(self) -> dict:
        return {
            "num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
            "group_size": self.group_size, "strategy": self.strategy, "dynamic": False,
        }


@dataclass(frozen=True)
class Group:
    targets: tuple[str, ...]
    weights: WeightScheme


@dataclass(frozen=True)
class QuantizationConfig:
    """What the reader needs from config.json's quantization_config."""

    format: str
    groups: tuple[Group, ...]
    ignore: tuple[str, ...]


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def fused_siblings(weight_name: str) -> list[str]:
    """The weight names vLLM fuses with this one (itself included), e.g. q/k/v_proj of one attention."""
    prefix, _, leaf = module_of(weight_name).rpartition(".")
    for group in FUSED:
        if leaf in group:
            return [f"{prefix}.{member}.weight" for member in group]
    return [weight_name]


def quantization_config(scheme: WeightScheme, ignore: list[str]) -> dict:
    """config.json's quantization_config for one scheme applied to every linear layer but `ignore` (module names)."""
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme.to_json(), "input_activations": None, "output_activations": None, "format": None}},
        "format": FLOAT if scheme.type == "float" else PACKED,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": VERSION,
    }


def is_compressed_tensors(config: dict) -> bool:
    section = config.get("quantization_config")
    return isinstance(section, dict) and section.get("quant_method") == METHOD


def parse(config: dict, where: str) -> QuantizationConfig:
    """The parts of a compressed-tensors quantization_config the reader uses; refuses what it cannot rebuild."""
    section = config.get("quantization_config")
    try:
        fmt = str(section["format"])
        if fmt not in READABLE_FORMATS:
            raise SwtoolError(f"{where}: compressed-tensors format {fmt!r}; swtool reads {', '.join(READABLE_FORMATS)}")
        groups = []
        for name, group in dict(section.get("config_groups") or {}).items():
            weights = group.get("weights")
            if weights is None:
                continue  # activation-only group: no weight to rebuild
            strategy = weights.get("strategy") or ("channel" if weights.get("group_size") == -1 else "group" if weights.get("group_size") else "tensor")
            if strategy not in ("channel", "group", "tensor"):
                raise SwtoolError(f"{where}: config group {name}: weight strategy {strategy!r}; swtool reads channel, group and tensor")
            scheme = WeightScheme(int(weights.get("num_bits", 8)), str(weights.get("type", "int")), bool(weights.get("symmetric", True)), strategy, weights.get("group_size"))
            if not (scheme.type == "int" and 1 <= scheme.num_bits <= 8) and not (scheme.type == "float" and scheme.num_bits == 8):
                raise SwtoolError(f"{where}: config group {name}: {scheme.type}{scheme.num_bits} weights; swtool reads int1..int8 and float8 (E4M3)")
            groups.append(Group(tuple(str(t) for t in group.get("targets") or ()), scheme))
        return QuantizationConfig(fmt, tuple(groups), tuple(str(i) for i in section.get("ignore") or ()))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SwtoolError(f"{where}: damaged compressed-tensors quantization_config ({exc.__class__.__name__}: {exc})") from None


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def scheme_for(config: QuantizationConfig, module: str, where: str) -> WeightScheme:
    """The weight scheme of a module stored quantized: the group naming it (exactly or by `re:`), else a class-wide group."""
    for group in config.groups:
        if any(_matches(module, t) for t in group.targets):
            return group.weights
    for group in config.groups:  # targets by class name ("Linear"): the stored tensors already say the module is quantized
        if any(not t.startswith("re:") and "." not in t for t in group.targets):
            return group.weights
    raise SwtoolError(f"{where}: module {module} is stored quantized, but no config group targets it")
