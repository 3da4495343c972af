"""Regenerate tests/fixtures/gguf_mix_types.json: the tensor types llama-quantize picks at every mix.

For each tiny model described in MODELS this writes an F16 GGUF with gguf-py
(random small values; only names, shapes and a few hyper-parameters matter to
the type rules), runs llama-quantize at every mix, reads each output's tensor
types back with gguf-py and records them in tensor order as one string per mix
("Q4_K Q6_K F32 Q5_0! ...", where "!" marks a tensor llama-quantize warned it
fell back on because of its row length), with the general.file_type it stored. The golden keeps
each model's description, not its tensor list: tests/formats/test_gguf_mixes.py
expands it with `expand` below (imported from this file) and checks that
swtool.formats.gguf.mixes gives exactly these types, without llama.cpp.

    SWTOOL_LLAMA_CPP=/path/to/llama.cpp/build/bin python scripts/golden/mix_types_golden.py

Made with llama.cpp b11434 (the version swtool/formats/gguf_mixes.py follows).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf_mix_types.json"
ALL_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
             "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32")

# A model: hyper-parameters, then its tensors as [name, torch shape, stored type]; a name with {i} repeats
# for every layer. Dimensions in shapes are written as the letters below (E embedding, F feed-forward,
# Q query rows, K key/value rows, X experts, V vocabulary, S shared-expert feed-forward; "2F" is twice F,
# "QKV" the fused rows) or as numbers.
LLAMA_LAYER = [
    ["blk.{i}.attn_norm.weight", ["E"], "F32"],
    ["blk.{i}.attn_q.weight", ["Q", "E"], "F16"],
    ["blk.{i}.attn_k.weight", ["K", "E"], "F16"],
    ["blk.{i}.attn_v.weight", ["K", "E"], "F16"],
    ["blk.{i}.attn_output.weight", ["E", "Q"], "F16"],
    ["blk.{i}.ffn_norm.weight", ["E"], "F32"],
    ["blk.{i}.ffn_gate.weight", ["F", "E"], "F16"],
    ["blk.{i}.ffn_up.weight", ["F", "E"], "F16"],
    ["blk.{i}.ffn_down.weight", ["E", "F"], "F16"],
]
HEAD = [["token_embd.weight", ["V", "E"], "F16"], ["output_norm.weight", ["E"], "F32"]]
UNTIED = HEAD + [["output.weight", ["V", "E"], "F16"]]
QKV_BIAS = [["blk.{i}.attn_q.bias", ["Q"], "F32"], ["blk.{i}.attn_k.bias", ["K"], "F32"],
            ["blk.{i}.attn_v.bias", ["K"], "F32"]]
MOE_LAYER = LLAMA_LAYER[:6] + [
    ["blk.{i}.ffn_gate_inp.weight", ["X", "E"], "F32"],
    ["blk.{i}.ffn_gate_exps.weight", ["X", "F", "E"], "F16"],
    ["blk.{i}.ffn_up_exps.weight", ["X", "F", "E"], "F16"],
    ["blk.{i}.ffn_down_exps.weight", ["X", "E", "F"], "F16"],
]
SHARED_EXPERT = [
    ["blk.{i}.ffn_gate_inp_shexp.weight", ["E"], "F32"],
    ["blk.{i}.ffn_gate_shexp.weight", ["S", "E"], "F16"],
    ["blk.{i}.ffn_up_shexp.weight", ["S", "E"], "F16"],
    ["blk.{i}.ffn_down_shexp.weight", ["E", "S"], "F16"],
]
FALCON_LAYER = [  # one attn_qkv, no gate
    ["blk.{i}.attn_norm.weight", ["E"], "F32"],
    ["blk.{i}.attn_norm.bias", ["E"], "F32"],
    ["blk.{i}.attn_qkv.weight", ["QKV", "E"], "F16"],
    ["blk.{i}.attn_output.weight", ["E", "Q"], "F16"],
    ["blk.{i}.ffn_up.weight", ["F", "E"], "F16"],
    ["blk.{i}.ffn_down.weight", ["E", "F"], "F16"],
]
PHI3_LAYER = [  # one attn_qkv; ffn_up holds gate and up (2F rows)
    ["blk.{i}.attn_norm.weight", ["E"], "F32"],
    ["blk.{i}.attn_qkv.weight", ["QKV", "E"], "F16"],
    ["blk.{i}.attn_output.weight", ["E", "Q"], "F16"],
    ["blk.{i}.ffn_norm.weight", ["E"], "F32"],
    ["blk.{i}.ffn_up.weight", ["2F", "E"], "F16"],
    ["blk.{i}.ffn_down.weight", ["E", "F"], "F16"],
]
SLIM_LAYER = [LLAMA_LAYER[3], LLAMA_LAYER[8]]
"""attn_v and ffn_down only: enough for the 80-layer (70B) rule, small enough for the golden."""
SEVENTY_B_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
"""The mixes whose attn_v can be Q3_K or Q4_K, which a 70B model raises to Q5_K."""


def model(arch: str, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, tensors: list,
          *, n_vocab: int = 32, n_expert: int = 0, n_ff_shexp: int = 0, imatrix: bool = False,
          mixes: tuple[str, ...] = ALL_MIXES) -> dict:
    return {"arch": arch, "n_layer": n_layer, "n_embd": n_embd, "n_ff": n_ff, "n_head": n_head,
            "n_head_kv": n_head_kv, "n_vocab": n_vocab, "n_expert": n_expert, "n_ff_shexp": n_ff_shexp,
            "imatrix": imatrix, "tensors": tensors, "mixes": list(mixes)}


MODELS: dict[str, dict[str, Any]] = {
    "llama_2l_mha_untied": model("llama", 2, 256, 512, 4, 4, UNTIED + LLAMA_LAYER),
    "llama_16l_gqa4_untied_ropefreqs": model(
        "llama", 16, 256, 256, 8, 2, UNTIED + [["rope_freqs.weight", [16], "F32"]] + LLAMA_LAYER),
    "llama_8l_gqa3_tied_576": model("llama", 8, 576, 256, 9, 3, HEAD + LLAMA_LAYER),
    "llama_4l_tied_96_ff80": model("llama", 4, 96, 80, 3, 1, HEAD + LLAMA_LAYER),
    "mixtral_4l_8experts": model("llama", 4, 256, 256, 8, 2, UNTIED + MOE_LAYER, n_expert=8),
    "qwen2moe_2l_4experts_shared": model(
        "qwen2moe", 2, 256, 256, 4, 4, UNTIED + MOE_LAYER + SHARED_EXPERT + QKV_BIAS, n_expert=4, n_ff_shexp=512),
    "qwen2_3l_tied_bias": model("qwen2", 3, 256, 512, 4, 2, HEAD + LLAMA_LAYER + QKV_BIAS),
    "gemma_2l_tied": model("gemma", 2, 256, 512, 4, 1, HEAD + LLAMA_LAYER),
    "falcon_8l_qkv": model("falcon", 8, 256, 512, 4, 1, UNTIED + FALCON_LAYER),
    "phi3_4l_qkv": model("phi3", 4, 256, 512, 4, 4, UNTIED + PHI3_LAYER),
    "llama_80l_gqa_70b": model("llama", 80, 256, 256, 8, 2, UNTIED + SLIM_LAYER, mixes=SEVENTY_B_MIXES),
    "llama_80l_mha_65b": model("llama", 80, 256, 256, 4, 4, UNTIED + SLIM_LAYER, mixes=("Q3_K_S", "Q4_K_S")),
    "llama_16l_imatrix": model("llama", 16, 256, 256, 8, 2, UNTIED + LLAMA_LAYER, imatrix=True,
                               mixes=("Q4_0", "Q5_0", "Q4_1", "Q4_K_M", "Q8_0")),
}


def dims(desc: dict) -> dict[str, int]:
    head_dim = desc["n_embd"] // desc["n_head"]
    q, k = desc["n_head"] * head_dim, desc["n_head_kv"] * head_dim
    return {"E": desc["n_embd"], "F": desc["n_ff"], "Q": q, "K": k, "QKV": q + 2 * k, "X": desc["n_expert"],
            "V": desc["n_vocab"], "S": desc["n_ff_shexp"]}


def expand(desc: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """The model's tensors, (name, torch shape, stored type), non-layer ones first, then layer by layer."""
    size = dims(desc)

    def shape(parts: list) -> tuple[int, ...]:  # "2F" is twice F; a number is itself
        return tuple(p if isinstance(p, int) else size[p] if p in size else int(p[:-1]) * size[p[-1]] for p in parts)

    out = [(name, shape(parts), stored) for name, parts, stored in desc["tensors"] if "{i}" not in name]
    for i in range(desc["n_layer"]):
        out += [(name.format(i=i), shape(parts), stored) for name, parts, stored in desc["tensors"] if "{i}" in name]
    return out


def write_f16(desc: dict, path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), desc["arch"])
    writer.add_block_count(desc["n_layer"])
    writer.add_context_length(128)
    writer.add_embedding_length(desc["n_embd"])
    writer.add_feed_forward_length(desc["n_ff"])
    writer.add_head_count(desc["n_head"])
    writer.add_head_count_kv(desc["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if desc["n_expert"]:
        writer.add_expert_count(desc["n_expert"])
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(desc["n_ff"])
    if desc["n_ff_shexp"]:
        writer.add_expert_shared_feed_forward_length(desc["n_ff_shexp"])
    rng = np.random.default_rng(0)
    for name, shape, stored in expand(desc):
        dtype = np.float16 if stored == "F16" else np.float32
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FALLBACK_WARNING = re.compile(r"warning: (\S+)\s+- ncols .*-> falling back to")


def write_imatrix(desc: dict, path: Path) -> None:
    """A legacy-format importance matrix (all ones, one call) for every weight llama-quantize may quantize:
    only its presence matters to the type rules."""
    out = bytearray(struct.pack("<i", 0))
    count = 0
    for name, shape, _ in expand(desc):
        if len(shape) < 2:
            continue
        values = int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1]  # row length, once per expert
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", 1, values)
        out += np.ones(values, dtype="<f4").tobytes()
        count += 1
    out[:4] = struct.pack("<i", count)
    out += struct.pack("<ii", 1, 0)  # chunk count, no dataset name
    path.write_bytes(bytes(out))


def quantize(bin_dir: Path, src: Path, mix: str, out: Path, imatrix: Path | None = None) -> tuple[dict[str, str], dict[str, tuple[int, ...]], int, list[str]]:
    """llama-quantize at one mix: (tensor -> type, tensor -> torch shape, general.file_type, tensors it warned about falling back)."""
    import gguf

    options = ["--imatrix", str(imatrix)] if imatrix else []
    run = subprocess.run([str(bin_dir / "llama-quantize"), *options, str(src), str(out), mix, "1"],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"llama-quantize {mix} failed on {src.name}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    file_type = int(reader.fields["general.file_type"].contents())
    fallbacks = FALLBACK_WARNING.findall(run.stdout + run.stderr)
    return types, shapes, file_type, fallbacks


def dump(golden: dict) -> str:
    """JSON with one line per model field, tensor entry and mix: small and still readable in a diff."""
    lines = ["{", f' "llama_cpp": {json.dumps(golden["llama_cpp"])},', f' "generator": {json.dumps(golden["generator"])},',
             ' "models": {']
    for i, (name, desc) in enumerate(golden["models"].items()):
        fields = [f'   {json.dumps(k)}: {json.dumps(v)}' for k, v in desc.items() if k not in ("tensors", "mixes")]
        tensors = ",\n".join(f"    {json.dumps(t)}" for t in desc["tensors"])
        mixes = ",\n".join(f"    {json.dumps(m)}: {json.dumps(r)}" for m, r in desc["mixes"].items())
        body = ",\n".join(fields + [f'   "tensors": [\n{tensors}\n   ]', f'   "mixes": {{\n{mixes}\n   }}'])
        lines.append(f"  {json.dumps(name)}: {{\n{body}\n  }}" + ("," if i < len(golden["models"]) - 1 else ""))
    lines += [" }", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == golden
    return text


def main() -> None:
    bin_dir = Path(os.environ.get("SWTOOL_LLAMA_CPP", ""))
    if not (bin_dir / "llama-quantize").exists():
        sys.exit("set SWTOOL_LLAMA_CPP to the llama.cpp bin folder holding llama-quantize")
    golden: dict[str, Any] = {"llama_cpp": "b11434", "generator": "scripts/golden/mix_types_golden.py", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, desc in MODELS.items():
            src = Path(tmp) / f"{name}.gguf"
            write_f16(desc, src)
            imatrix = Path(tmp) / f"{name}.imatrix.dat" if desc["imatrix"] else None
            if imatrix:
                write_imatrix(desc, imatrix)
            expanded = {n: shape for n, shape, _ in expand(desc)}
            names = list(expanded)
            results = {}
            for mix in desc["mixes"]:
                types, shapes, file_type, fallbacks = quantize(bin_dir, src, mix, Path(tmp) / "out.gguf", imatrix)
                if shapes != expanded:
                    sys.exit(f"{name} {mix}: llama-quantize wrote other tensors than the description")
                marked = [types[n] + ("!" if n in fallbacks else "") for n in names]
                results[mix] = {"file_type": file_type, "types": " ".join(marked)}
                print(f"{name} {mix}: {len(fallbacks)} fallbacks", file=sys.stderr)
            golden["models"][name] = {**desc, "mixes": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dump(golden))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
