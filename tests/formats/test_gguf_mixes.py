"""swtool's restatement of llama-quantize's mix rules against what llama-quantize itself chose.

tests/fixtures/gguf_mix_types.json was made by scripts/golden/mix_types_golden.py, which ran
llama-quantize (b11434) on tiny F16 GGUF models; each model is stored as a description, which the
generator's own `expand` turns back into the tensor list it wrote, so no model file or llama.cpp
binary is needed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from swtool.errors import SwtoolError
from swtool.formats.gguf.mixes import (
    LLAMA_CPP_VERSION,
    MIXES,
    ModelFacts,
    TensorSpec,
    ggml_n_dims,
    model_facts,
    parse_mix,
    plan_mix,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "gguf_mix_types.json").read_text())
_spec = importlib.util.spec_from_file_location("mix_types_golden", ROOT / "scripts" / "golden" / "mix_types_golden.py")
generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)

BIN = os.environ.get("SWTOOL_LLAMA_CPP")
CASES = [(model, mix) for model, desc in GOLDEN["models"].items() for mix in desc["mixes"]]


def specs(desc: dict) -> tuple[list[TensorSpec], ModelFacts]:
    tensors = [TensorSpec(name, shape, T[stored]) for name, shape, stored in generator.expand(desc)]
    facts = ModelFacts(desc["arch"], desc["n_layer"], desc["n_head"], desc["n_head_kv"], desc["n_expert"])
    return tensors, facts


@pytest.mark.parametrize(("model", "mix"), CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_types_match_llama_quantize(model: str, mix: str) -> None:
    desc = GOLDEN["models"][model]
    tensors, facts = specs(desc)
    expected = desc["mixes"][mix]["types"].split()
    plan = plan_mix(mix, tensors, facts, has_imatrix=desc["imatrix"])
    got = [plan.types[t.name].name + ("!" if any(f.name == t.name for f in plan.fallbacks) else "") for t in tensors]
    wrong = [f"{t.name}: {g} (llama-quantize {e})" for t, g, e in zip(tensors, got, expected) if g != e]
    assert not wrong, f"{len(wrong)} of {len(tensors)} differ: " + "; ".join(wrong[:8])
    assert int(plan.file_type) == desc["mixes"][mix]["file_type"]
    # llama-quantize visits tensors by layer whatever the file order, so its running counts do not depend on it
    assert plan_mix(mix, tensors[::-1], facts, has_imatrix=desc["imatrix"]).types == plan.types


def test_golden_covers_the_rules_that_matter() -> None:
    """The golden must exercise every mix, the K-quant fallbacks and the bumps, or matching it proves little."""
    assert GOLDEN["llama_cpp"] == LLAMA_CPP_VERSION
    mixes = {mix for desc in GOLDEN["models"].values() for mix in desc["mixes"]}
    assert mixes == set(MIXES)
    everything = " ".join(r["types"] for desc in GOLDEN["models"].values() for r in desc["mixes"].values()).split()
    for marked in ("Q4_0!", "Q5_0!", "Q5_1!", "Q8_0!", "F16!", "Q6_K", "Q5_K", "Q8_0"):
        assert marked in everything, marked
    with_imatrix = [desc["mixes"]["Q4_0"]["types"].split() for desc in GOLDEN["models"].values() if desc["imatrix"]]
    assert with_imatrix and "Q4_1" in with_imatrix[0]


def test_fallback_notes_name_tensor_and_types() -> None:
    desc = GOLDEN["models"]["llama_4l_tied_96_ff80"]
    tensors, facts = specs(desc)
    plan = plan_mix("q4_k_m", tensors, facts)
    notes = {f.name: f.note for f in plan.fallbacks}
    assert len(plan.notes) == len(plan.fallbacks) == len(notes)
    assert notes["blk.3.ffn_down.weight"] == (  # the last layer gets Q6_K, which cannot take 80
        "blk.3.ffn_down.weight: row length 80 is not a multiple of 256 (the Q6_K block size); "
        "written as F16, as llama-quantize does")
    assert notes["blk.1.attn_q.weight"].endswith("(the Q4_K block size); written as Q5_0, as llama-quantize does")
    assert all("\n" not in note for note in plan.notes)


def test_unknown_mix_lists_the_valid_names() -> None:
    with pytest.raises(SwtoolError) as caught:
        parse_mix("Q4_K_XL")
    message = str(caught.value)
    assert "Q4_K_XL" in message and "\n" not in message
    for name in MIXES:
        assert name in message
    assert parse_mix("q5_k_m").name == "Q5_K_M"


def test_one_row_weights_count_as_1d() -> None:
    """ggml_n_dims drops trailing size-1 dimensions (ggml order): a (1, n) weight is not quantized."""
    assert ggml_n_dims((1, 256)) == 1
    assert ggml_n_dims((256, 1)) == 2
    assert ggml_n_dims((8, 1, 256)) == 3
    facts = ModelFacts("llama", 1, 4, 4)
    plan = plan_mix("Q4_K_M", [TensorSpec("blk.0.x.weight", (1, 256), T.F16), TensorSpec("output.weight", (256, 1), T.F16)], facts)
    assert plan.types == {"blk.0.x.weight": T.F16, "output.weight": T.F16}


DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\] (\S+)\s+- \[[^]]*\], type =\s*(\w+), size =[^(\n]*(?:\((\w+)\))?$", re.MULTILINE)


@pytest.mark.llamacpp
@pytest.mark.skipif(not BIN, reason="SWTOOL_LLAMA_CPP is not set (the llama.cpp build/bin folder with llama-quantize)")
def test_real_model_types_match_llama_quantize_dry_run(smollm2_gguf: Path, tmp_path: Path) -> None:
    """SmolLM2 (30 layers, rows of 576, tied, GQA 3) read from its GGUF: llama-quantize --dry-run at every mix."""
    reader = gguf.GGUFReader(str(smollm2_gguf))
    arch = reader.fields["general.architecture"].contents()
    values = {key: field.contents() for key, field in reader.fields.items() if key.startswith(f"{arch}.")}
    facts = model_facts(arch, values)
    tensors = [TensorSpec(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type) for t in reader.tensors]
    for mix in MIXES:
        run = subprocess.run(
            [str(Path(BIN) / "llama-quantize"), "--allow-requantize", "--dry-run", str(smollm2_gguf), str(tmp_path / "x.gguf"), mix, "1"],
            capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        expected = {name: (new or old).upper() for name, old, new in DRY_RUN_LINE.findall(run.stdout + run.stderr)}
        assert len(expected) == len(tensors)
        got = {name: qtype.name for name, qtype in plan_mix(mix, tensors, facts).types.items()}
        assert got == expected, mix


def test_model_facts_read_gguf_key_values_as_llama_cpp_does() -> None:
    facts = model_facts("llama", {"llama.block_count": 30, "llama.attention.head_count": [9] * 30,
                                  "llama.attention.head_count_kv": [3] * 30})
    assert (facts.n_layer, facts.gqa, facts.n_expert) == (30, 3, 0)
    assert model_facts("qwen2moe", {"qwen2moe.block_count": 2, "qwen2moe.attention.head_count": 4,
                                    "qwen2moe.expert_count": 60}).gqa == 1  # no head_count_kv: as many as heads
    with pytest.raises(SwtoolError, match="llama.block_count"):
        model_facts("llama", {"llama.attention.head_count": 4})


def test_moe_ffn_down_outside_a_layer_is_a_clear_error() -> None:
    facts = ModelFacts("llama", 2, 4, 4, n_expert=8)
    with pytest.raises(SwtoolError, match="cannot tell its layer"):
        plan_mix("Q4_K_M", [TensorSpec("blk.5.ffn_down_exps.weight", (8, 256, 256), T.F16)], facts)
