"""`swtool quantize HF_DIR --format gguf` for every family: swtool reads the file back as the HF directory,
and llama.cpp runs it as swtool does (with SWTOOL_LLAMA_CPP set)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import gguf
import pytest
import torch

from clirun import assert_user_error, invoke
from swtool.checkpoint import open_checkpoint
from swtool.tokenizer import encode
from test_gguf_families import CASES, chunk_perplexities, logits
from tiny import build

FAMILIES = ["llama", "llama-tied", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gemma3_text", "mixtral"]
TYPES = ("F32", "Q8_0")
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


def add_byte_merge(directory: Path) -> None:
    """llama.cpp refuses a gpt2 vocabulary without merges: merge the bytes 0x00 0x01 (never adjacent in the
    test text) into id 256, so tokenization stays byte by byte for swtool, transformers and llama.cpp alike."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"]["\u0100\u0101"] = 256
    data["model"]["merges"] = [["\u0100", "\u0101"]]
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family case, HF directory, {type: GGUF file written by the CLI})."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    build(case.removesuffix("-tied"), root / "hf", **CASES[case])
    add_byte_merge(root / "hf")
    files = {}
    for type_name in TYPES:
        files[type_name] = root / f"{type_name}.gguf"
        result = invoke("quantize", root / "hf", "-o", files[type_name], "--format", "gguf", "--type", type_name, "--no-keep-super", "-q")
        assert result.exit_code == 0, result.output
    return case, root / "hf", files


def test_swtool_reads_the_gguf_back_as_the_hf_directory(converted):
    case, hf_dir, files = converted
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


def test_a_held_expert_super_weight_is_recorded_with_its_expert(tmp_path):
    from swtool.checkpoint.gguf_out import plan_gguf
    from swtool.quant.supers import Held

    build("mixtral", tmp_path / "hf")
    held = [Held("model.layers.1.block_sparse_moe.experts.2.w2.weight", 5, 17)]
    plan = plan_gguf(open_checkpoint(tmp_path / "hf"), "Q4_0", super_weights=held, keep_super=True)
    tensor = next(t for t in plan.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert tensor.qtype.name == "Q8_0"
    assert next(t for t in plan.tensors if t.name == "blk.0.ffn_down_exps.weight").qtype.name == "Q4_0"
    meta = {k: v.value for k, v in plan.metadata.items() if k.startswith("swtool.super_weights.")}
    assert meta["swtool.super_weights.tensor"] == ["blk.1.ffn_down_exps.weight"]
    assert meta["swtool.super_weights.expert"] == [2] and meta["swtool.super_weights.row"] == [5]


def test_a_model_gguf_cannot_express_is_refused_in_one_line_and_leaves_no_file(tmp_path):
    build("gemma2", tmp_path / "hf")  # query_pre_attn_scalar 24, but llama.cpp scales gemma2 queries by head_dim (16)
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q")
    assert_user_error(result, "query_pre_attn_scalar 24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_architecture_llama_cpp_lacks_is_refused_in_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import dataclasses

    import swtool.checkpoint.gguf_out as gguf_out

    build("olmo2", tmp_path / "hf")
    family = gguf_out.family_for("olmo2")
    monkeypatch.setattr(gguf_out, "family_for", lambda *_: dataclasses.replace(family, gguf_arch=None))
    result = invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--no-keep-super", "-q")
    assert_user_error(result, "model_type 'olmo2': llama.cpp has no architecture for it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.llamacpp
def test_llama_cpp_runs_swtool_gguf_as_swtool_does(converted, tmp_path):
    """llama-perplexity's running perplexity per 64-token chunk equals swtool's forward on the same file:
    within 2e-3 at F32; within 3e-2 at Q8_0, where llama.cpp also rounds the activations to 8 bits."""
    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    if not folder:
        pytest.skip("set SWTOOL_LLAMA_CPP to the folder of llama.cpp's binaries (llama-perplexity)")
    _, _, files = converted
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for type_name, tolerance in zip(TYPES, (2e-3, 3e-2)):
        run = subprocess.run(
            [str(Path(folder) / "llama-perplexity"), "-m", str(files[type_name]), "-f", str(text), "-c", "64", "-b", "64", "-t", "1"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "LD_LIBRARY_PATH": folder},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", run.stdout + run.stderr)]
        checkpoint = open_checkpoint(files[type_name])
        ours = chunk_perplexities(checkpoint, encode(checkpoint, text.read_text()), 64)
        # llama.cpp logs from a worker thread and now and then loses its last line at exit: compare what it printed
        assert len(ours) >= len(theirs) >= 3
        assert ours[: len(theirs)] == pytest.approx(theirs, rel=tolerance), type_name
