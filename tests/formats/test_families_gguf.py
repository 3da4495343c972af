"""Every family through GGUF: converted as llama.cpp does, written by swtool, rewritten, exported, run by llama.cpp.

Each family case (tests/helpers/families.py) is built once per source and every check runs on it:

- `converted`: the tiny HF model and the GGUF the test converter makes of it with llama.cpp's conventions
  (tests/helpers/gguf_tiny.py). swtool reads the GGUF as the HF directory; rewritten at F32 it comes back
  byte for byte; swtool's own writer, given the HF directory, writes what the converter wrote;
  `swtool dequantize` of it gives transformers the same model; llama.cpp runs it as swtool does.
- `written`: the GGUF files `swtool quantize HF_DIR --format gguf` writes at F32 and Q8_0, RoPE scalings
  included. swtool reads them back as the HF directory, and llama.cpp runs them as swtool does.

Then the checks of one family's particulars (Mixtral's merged experts, Phi-3's LongRoPE, llama3 RoPE as
rope_freqs, models GGUF cannot express). llama.cpp checks are marked `llamacpp` and need SWTOOL_LLAMA_CPP.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import pytest
import torch

from swtool.families.config import ModelConfig
from swtool.families.rope import llama3_rope_factors
from swtool.formats.hf.export import llama3_scaling
from swtool.formats.open import open_checkpoint
from swtool.model.tokenizer import encode
from tests.helpers import llamacpp
from tests.helpers.clirun import assert_user_error, invoke
from tests.helpers.families import GGUF_CASES, GGUF_OPTIONS, WRITTEN, family_of
from tests.helpers.forward import chunk_perplexities, logits
from tests.helpers.gguf_files import fields, tensor_bytes, write
from tests.helpers.gguf_tiny import convert
from tests.helpers.tiny import CLASSES, add_byte_merge, build

TYPES = ("F32", "Q8_0")
TEXT = llamacpp.TEXT


@pytest.fixture(scope="module", params=list(GGUF_CASES))
def converted(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(case, HF directory, the GGUF the test converter made of it)."""
    case = request.param
    root = tmp_path_factory.mktemp(f"converted-{case}")
    build(family_of(case), root / "hf", **GGUF_CASES[case])
    convert(root / "hf", root / "tiny.gguf")
    return case, root / "hf", root / "tiny.gguf"


@pytest.fixture(scope="module", params=WRITTEN)
def written(request, tmp_path_factory) -> tuple[str, Path, dict[str, Path]]:
    """(case, HF directory, {type: GGUF file written by the CLI})."""
    case = request.param
    root = tmp_path_factory.mktemp(f"written-{case}")
    build(family_of(case), root / "hf", **GGUF_OPTIONS[case])
    add_byte_merge(root / "hf")
    files = {}
    for type_name in TYPES:
        files[type_name] = root / f"{type_name}.gguf"
        result = invoke("quantize", root / "hf", "-o", files[type_name], "--format", "gguf", "--type", type_name, "--no-keep-super", "-q")
        assert result.exit_code == 0, result.output
    return case, root / "hf", files


def transformers_logits(directory, tokens: torch.Tensor):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(tokens).logits


# -- the converted GGUF of each family ------------------------------------------------------------


def test_gguf_reads_like_the_hf_directory(converted):
    _, hf_dir, gguf_path = converted
    hf, gg = open_checkpoint(hf_dir), open_checkpoint(gguf_path)
    assert gg.format == "gguf"
    wanted = [n for n in hf.names() if not (n == "lm_head.weight" and gg.config.tie_embeddings)]
    for name in wanted:
        assert gg.has(name), name
        torch.testing.assert_close(gg.load(name), hf.load(name), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert encode(gg, "Apple Inc. is a worldwide tech company.") == encode(hf, "Apple Inc. is a worldwide tech company.")
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    reference = logits(hf, tokens)
    torch.testing.assert_close(logits(gg, tokens), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_gguf_to_gguf_reproduces_every_family_exactly(converted, tmp_path):
    """A GGUF converted as llama.cpp does, rewritten at F32: every tensor (Gemma's norm offset,
    Q/K permutation included) and every model key come back unchanged."""
    _, _, gguf_path = converted
    source = open_checkpoint(gguf_path)
    _, reader = write(source, tmp_path / "out.gguf", "F32")
    assert tensor_bytes(reader) == tensor_bytes(source.reader)
    before, after = fields(source.reader), fields(reader)
    assert {k: v for k, v in before.items() if k != "general.file_type"} == {
        k: v for k, v in after.items() if k not in ("general.file_type", "general.quantization_version")
    }


def test_hf_input_matches_an_independent_converter(converted, tmp_path):
    """From an HF directory, swtool writes the tensors and hyper-parameters llama.cpp's conventions give
    (names, Q/K permutation, Gemma's 1 + w norms, Mixtral's experts stacked into ffn_*_exps)."""
    _, hf_dir, gguf_path = converted
    _, reader = write(open_checkpoint(hf_dir), tmp_path / "ours.gguf", "F32")
    reference = gguf.GGUFReader(gguf_path)
    assert tensor_bytes(reader) == tensor_bytes(reference)
    ours, theirs = fields(reader), fields(reference)
    arch = theirs["general.architecture"]
    assert ours["general.architecture"] == arch
    for key in [k for k in theirs if k.startswith(arch + ".")]:
        assert ours[key] == pytest.approx(theirs[key]), key


def test_dequantized_gguf_is_the_same_model_for_transformers(converted, tmp_path):
    """`swtool dequantize model.gguf -o DIR` of the converted file (llama.cpp's conventions, not swtool's writer):
    transformers loads DIR as the family's class and computes the model swtool computes from the GGUF, and the
    HF model the GGUF was converted from; 16 tokens, longer than the sliding windows of the Gemma models."""
    case, hf_dir, gguf_path = converted
    result = invoke("dequantize", gguf_path, "-o", tmp_path / "out", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    ours = logits(open_checkpoint(gguf_path), tokens)
    name, theirs = transformers_logits(tmp_path / "out", tokens)
    assert name == CLASSES[family_of(case)][1]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * scale)
    _, original = transformers_logits(hf_dir, tokens)
    torch.testing.assert_close(theirs, original, rtol=0, atol=1e-4 * scale)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 4


@pytest.mark.llamacpp
@pytest.mark.parametrize("converted", ["llama", "olmo", "gemma2", "gemma3_text", "mixtral"], indirect=True)
def test_llama_cpp_runs_the_converted_gguf_as_swtool_does(converted, tmp_path):
    """llama.cpp's own inference on the converted file gives swtool's perplexities: the conversion conventions
    the GGUF tests rely on (Q/K permutation, Gemma's 1 + w, merged experts, metadata) are llama.cpp's."""
    _, _, gguf_path = converted
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    output = llamacpp.perplexity_output(gguf_path, text, 64)
    theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", output)]
    gg = open_checkpoint(gguf_path)
    ours = chunk_perplexities(gg, encode(gg, text.read_text()), 64)
    assert len(ours) == len(theirs) >= 3
    assert ours == pytest.approx(theirs, rel=2e-3)


@pytest.mark.parametrize("converted", ["mixtral"], indirect=True)
def test_gguf_experts_are_reported_under_the_merged_tensor(converted):
    gg = open_checkpoint(converted[2])
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    assert gg.stored_name(name) == "blk.1.ffn_down_exps.weight"
    assert gg.shape(name) == (64, 128)
    assert torch.equal(gg.load(name, rows=[5]), gg.load(name)[5:6])


def test_a_planted_expert_super_weight_in_gguf_is_found_and_held_in_its_own_expert(tmp_path):
    """Scan of a GGUF Mixtral reports the merged tensor plus the expert; quantize's hold-out maps it back to that expert.

    A tiny random model's perplexity does not depend on the planted weight, so it is a
    candidate (not a verified super weight): its JSON entry goes through the hold-out's
    resolution as `--super FILE` would send it."""
    from swtool.detect import scan
    from swtool.supers import resolve
    from tests.helpers.tiny import plant

    model = build("mixtral", tmp_path / "hf", seed=1)
    plant(model, tmp_path / "hf", [(1, 5, 17, 1)])  # expert 1 of this seed gets tokens on which channel 17 fires
    convert(tmp_path / "hf", tmp_path / "tiny.gguf")
    gg = open_checkpoint(tmp_path / "tiny.gguf")
    result = scan(gg)
    planted = [c for c in result.to_json()["candidates"] if (c["layer"], c["row"], c["col"]) == (1, 5, 17)]
    assert [(c["tensor"], c["expert"]) for c in planted] == [("blk.1.ffn_down_exps.weight", 1)]
    held = resolve(planted, gg, "scan")
    assert [(h.tensor, h.row, h.col) for h in held] == [("model.layers.1.block_sparse_moe.experts.1.w2.weight", 5, 17)]


# -- the GGUF files swtool writes of each family ------------------------------------------------


def test_swtool_reads_the_gguf_back_as_the_hf_directory(written):
    case, hf_dir, files = written
    hf = open_checkpoint(hf_dir)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    reference = logits(hf, tokens)
    scale = float(reference.abs().max())
    f32, q8 = open_checkpoint(files["F32"]), open_checkpoint(files["Q8_0"])
    assert encode(f32, TEXT) == encode(hf, TEXT)
    for name in hf.names():
        if name == "lm_head.weight" and hf.config.tie_embeddings:
            continue
        torch.testing.assert_close(f32.load(name), hf.load(name), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")  # Gemma: (1 + w) - 1
        if len(hf.shape(name)) == 2:  # Q8_0: within half a step of each 32-block's scale, so of the tensor's max/127
            bound = float(hf.load(name).abs().max()) / 127
            assert float((q8.load(name) - hf.load(name)).abs().max()) <= bound, name
    torch.testing.assert_close(logits(f32, tokens), reference, rtol=0, atol=1e-4 * scale)
    assert float((logits(q8, tokens) - reference).abs().max()) < 0.05 * scale
    types = {t.name: t.tensor_type.name for t in q8.reader.tensors}
    assert types["blk.0.ffn_down_exps.weight" if case == "mixtral" else "blk.0.ffn_down.weight"] == "Q8_0"


@pytest.mark.llamacpp
def test_llama_cpp_runs_swtool_gguf_as_swtool_does(written, tmp_path):
    """llama-perplexity's running perplexity per 64-token chunk equals swtool's forward on the same file:
    within 2e-3 at F32; within 3e-2 at Q8_0, where llama.cpp also rounds the activations to 8 bits."""
    llamacpp.folder()
    _, _, files = written
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for type_name, tolerance in zip(TYPES, (2e-3, 3e-2)):
        output = llamacpp.perplexity_output(files[type_name], text, 64)
        theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", output)]
        checkpoint = open_checkpoint(files[type_name])
        ours = chunk_perplexities(checkpoint, encode(checkpoint, text.read_text()), 64)
        # llama.cpp logs from a worker thread and now and then loses the end of its last line at exit: compare the
        # values it printed whole (each is followed by a comma)
        assert len(ours) >= len(theirs) >= 3
        assert ours[: len(theirs)] == pytest.approx(theirs, rel=tolerance), type_name


def test_phi3_longrope_travels_as_factor_tensors(tmp_path):
    """LongRoPE becomes llama.cpp's rope_factors_long/short and attn_factor key; swtool reads them back as the
    HF config's scaling, so prompts shorter and longer than the original context give the HF directory's logits."""
    build("phi3", tmp_path / "hf", **GGUF_OPTIONS["phi3-longrope"])
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    reader = gguf.GGUFReader(out)
    factors = {t.name: [float(v) for v in t.data] for t in reader.tensors if t.name.startswith("rope_factors")}
    assert factors == {"rope_factors_long.weight": [1.0, 2.0, 3.5, 6.0], "rope_factors_short.weight": pytest.approx([1.0, 1.1, 1.3, 1.6])}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["phi3.rope.scaling.original_context_length"] == 32
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + math.log(8) / math.log(32)) ** 0.5)
    hf, gg = open_checkpoint(tmp_path / "hf"), open_checkpoint(out)
    for length in (20, 60):  # short factors, then long ones
        tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        reference = logits(hf, tokens)
        torch.testing.assert_close(logits(gg, tokens), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_mixtral_experts_are_one_3d_tensor_per_projection(tmp_path):
    build("mixtral", tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    reader = gguf.GGUFReader(out)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.1.ffn_down_exps.weight"] == [128, 64, 4]  # GGUF order: (in, out, expert)
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == [64, 128, 4]
    assert shapes["blk.1.ffn_gate_inp.weight"] == [64, 4]
    assert not any("experts." in name or "ffn_down.weight" in name for name in shapes)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    hf = open_checkpoint(tmp_path / "hf")
    data = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight").data
    assert torch.equal(torch.from_numpy(data[2].copy()), hf.load("model.layers.1.block_sparse_moe.experts.2.w2.weight"))


def test_a_planted_expert_super_weight_is_found_held_and_recorded_with_its_expert(tmp_path):
    """quantize --format gguf --keep-super on an HF Mixtral: the scan finds the weight in expert 1,
    the merged tensor holding it is raised to Q8_0, and the record names the expert.

    A tiny random model's perplexity does not depend on the planted weight, so the scan lists
    it as a candidate, not a super weight; its scan entry is handed to quantize with --super."""
    from tests.helpers.tiny import plant

    model = build("mixtral", tmp_path / "hf", seed=1)
    plant(model, tmp_path / "hf", [(1, 5, 17, 1)])  # expert 1 of this seed gets tokens on which channel 17 fires
    scanned = json.loads(invoke("scan", tmp_path / "hf", "--json").stdout)
    entry = [c for c in scanned["candidates"] if (c["layer"], c["row"], c["col"], c["expert"]) == (1, 5, 17, 1)]
    assert len(entry) == 1
    (tmp_path / "scan.json").write_text(json.dumps({"model": "m", "super_weights": entry}))
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "Q4_0", "--keep-super", "--super", tmp_path / "scan.json")
    assert result.exit_code == 0, result.output
    assert "written as Q8_0" in result.output
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.ffn_down_exps.weight"] == "Q4_0"
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("swtool.super_weights.")}
    assert meta["swtool.super_weights.tensor"] == ["blk.1.ffn_down_exps.weight"]
    assert meta["swtool.super_weights.expert"] == [1] and meta["swtool.super_weights.row"] == [5] and meta["swtool.super_weights.col"] == [17]
    weight = open_checkpoint(out).load("model.layers.1.block_sparse_moe.experts.1.w2.weight")[5, 17]
    assert abs(float(weight) - 30.0) < 0.2  # Q8_0 of the planted 30.0


def test_a_model_gguf_cannot_express_is_refused_in_one_line_and_leaves_no_file(tmp_path):
    build("gemma2", tmp_path / "hf")  # query_pre_attn_scalar 24, but llama.cpp scales gemma2 queries by head_dim (16)
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q")
    assert_user_error(result, "query_pre_attn_scalar 24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_architecture_llama_cpp_lacks_is_refused_in_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import dataclasses

    import swtool.formats.gguf.writer as gguf_out

    build("olmo2", tmp_path / "hf")
    family = gguf_out.family_for("olmo2")
    monkeypatch.setattr(gguf_out, "family_for", lambda *_: dataclasses.replace(family, gguf_arch=None))
    result = invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--no-keep-super", "-q")
    assert_user_error(result, "model_type 'olmo2': llama.cpp has no architecture for it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# -- back to an HF directory: RoPE scaling GGUF keeps its own way ----------------------------------


def test_llama3_rope_freqs_become_rope_scaling_again(tmp_path):
    """llama.cpp keeps llama3 RoPE scaling only as the rope_freqs tensor; the exported config reproduces its frequencies."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    build("llama", tmp_path / "hf", rope_parameters=rope, rope_scaling=rope)
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    gg = open_checkpoint(tmp_path / "m.gguf")
    assert gg.has("rope_freqs.weight") and gg.config.rope_scaling is None
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert "rope_freqs.weight" not in open_checkpoint(tmp_path / "out").names()
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    _, theirs = transformers_logits(tmp_path / "out", tokens)
    ours = logits(gg, tokens)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * float(ours.abs().max()))


def llama_config(head_dim: int, theta: float, scaling: dict | None = None) -> ModelConfig:
    return ModelConfig("llama", 64, 128, 2, 4, 4, head_dim, 300, 1e-5, theta, rope_scaling=scaling)


@pytest.mark.parametrize("head_dim, theta, original", [(128, 500000.0, 8192), (64, 10000.0, 2048), (16, 10000.0, 32), (16, 10000.0, 8), (8, 10000.0, 16)])
def test_llama3_parameters_are_recovered_from_the_divisors(head_dim, theta, original):
    """Llama 3.1's shape gives back its own parameters; tiny shapes, with at most one divisor between the
    two regimes, give parameters whose divisors are the same (the parameters themselves are not determined)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    divisors = llama3_rope_factors(llama_config(head_dim, theta, scaling))
    recovered = llama3_scaling(divisors, llama_config(head_dim, theta))
    if head_dim >= 64:
        assert recovered == scaling
    torch.testing.assert_close(llama3_rope_factors(llama_config(head_dim, theta, recovered)), divisors, rtol=1e-5, atol=0)


def test_divisors_that_are_not_llama3_are_refused():
    from swtool.errors import SwtoolError

    divisors = torch.tensor([1.0, 3.0, 2.0, 8.0, 8.0, 8.0, 8.0, 8.0])  # not monotonic
    with pytest.raises(SwtoolError, match="does not follow llama3 RoPE scaling"):
        llama3_scaling(divisors, llama_config(16, 10000.0))
    assert llama3_scaling(torch.ones(8), llama_config(16, 10000.0)) is None  # all ones: no scaling at all


@pytest.mark.parametrize("case", ["llama-tied", "qwen2"])
def test_transformers_reading_the_gguf_agrees_with_the_dequantized_directory(case, tmp_path):
    """Where transformers' own GGUF loader handles the tiny shapes (Llama, Qwen2; its Qwen3, Phi-3 and Gemma-2/3
    loaders build other models from these files, see README) it gives the logits of the dequantized directory."""
    import transformers

    build(family_of(case), tmp_path / "hf", **GGUF_CASES[case])
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    _, from_dir = transformers_logits(tmp_path / "out", tokens)
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(tokens).logits, from_dir, rtol=1e-5, atol=1e-5)


def test_a_longrope_gguf_dequantizes_to_the_same_phi3(tmp_path):
    """rope_factors_long/short and the attn_factor key become the config's LongRoPE scaling again."""
    build("phi3", tmp_path / "hf", **GGUF_OPTIONS["phi3-longrope"])
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out", "--dtype", "fp32").exit_code == 0
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["long_factor"] == [1.0, 2.0, 3.5, 6.0]
    assert scaling["original_max_position_embeddings"] == 32 and scaling["factor"] == 8.0
    assert not any(name.startswith("rope_factors") for name in open_checkpoint(tmp_path / "out").names())
    for length in (20, 60):
        tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        _, theirs = transformers_logits(tmp_path / "out", tokens)
        _, original = transformers_logits(tmp_path / "hf", tokens)
        torch.testing.assert_close(theirs, original, rtol=0, atol=1e-4 * float(original.abs().max()))
