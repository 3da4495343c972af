"""swtool quantize --format gguf and swtool dequantize of a GGUF, through the CLI."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from test_quantize_cli import DOWN, SUPER, bad, cli, model, super_json  # noqa: F401  (shared fixtures)


def types_and_fields(path):
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}, {k: f.contents() for k, f in reader.fields.items()}


def test_quantize_gguf_keep_super(model, super_json, tmp_path):  # noqa: F811
    out = tmp_path / "m.gguf"
    result = cli("quantize", model, "-o", out, "--format", "gguf", "--type", "Q4_0", "--keep-super", "--super", super_json)
    assert result.exit_code == 0, result.output
    types, meta = types_and_fields(out)
    layer, row, col = SUPER
    assert types[f"blk.{layer}.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert meta["swtool.super_weights.row"] == [row] and meta["swtool.super_weights.col"] == [col]
    options, inputs = json.loads(meta["swtool.options"]), json.loads(meta["swtool.inputs"])
    assert options["type"] == "Q4_0" and options["super_type"] == "Q8_0" and options["format"] == "gguf"
    weights = [digest for name, digest in inputs.items() if name.endswith("model.safetensors")]
    assert len(weights) == 1 and len(weights[0]) == 64 and "scan.json" in " ".join(inputs)
    assert meta["swtool.command"] == "quantize"
    assert "written as Q8_0" in result.output and "m.gguf" in result.output


def test_quantize_gguf_defaults_from_bits_and_super_type_f16(model, super_json, tmp_path):  # noqa: F811
    out = tmp_path / "m.gguf"
    assert cli("quantize", model, "-o", out, "--format", "gguf", "--bits", "8", "--super", super_json, "--super-type", "f16", "-q").exit_code == 0
    types, meta = types_and_fields(out)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert types[f"blk.{SUPER[0]}.ffn_down.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"


def test_fallback_is_said_on_stderr(tmp_path):
    import tiny

    tiny.build("llama", tmp_path / "odd", intermediate_size=100)
    result = cli("quantize", tmp_path / "odd", "-o", tmp_path / "odd.gguf", "--format", "gguf", "--type", "Q5_0", "--no-keep-super")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "blk.0.ffn_down.weight: row length 100 is not a multiple of 32 (the Q5_0 block size); written as F16, as llama-quantize does" in said


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "gguf", "--type", "Q4_K_XL"], "--type 'Q4_K_XL' is not a GGUF type or mix swtool writes; choose one of Q2_K, Q3_K_S"),
        (["--format", "gguf", "--type", "Q4_0", "--super-type", "Q4_K"], "--super-type 'Q4_K'"),
        (["--format", "gguf", "--type", "Q4_0", "--super-type", "Q4_1"], "--super-type 'Q4_1'"),
        (["--format", "gguf", "--bits", "3"], "--bits 3 has no GGML type"),
        (["--type", "Q8_0"], "--type applies to --format gguf only"),
    ],
)
def test_bad_gguf_options(model, super_json, tmp_path, args, message):  # noqa: F811
    assert message in bad(tmp_path, "quantize", model, "--super", super_json, *args)


def test_a_model_gguf_cannot_express_is_one_line_and_no_file(tmp_path):
    import tiny

    tiny.build("gemma2", tmp_path / "g2")  # query_pre_attn_scalar 24; llama.cpp would scale by head_dim 16
    assert "query_pre_attn_scalar 24" in bad(tmp_path, "quantize", tmp_path / "g2", "--format", "gguf", "--type", "Q8_0", "--no-keep-super")


def test_dequantize_gguf_gives_transformers_the_same_logits(model, super_json, tmp_path):  # noqa: F811
    import transformers

    gguf_path = tmp_path / "m.gguf"
    assert cli("quantize", model, "-o", gguf_path, "--format", "gguf", "--type", "Q5_1", "--super", super_json, "-q").exit_code == 0
    out = tmp_path / "hf"
    result = cli("dequantize", gguf_path, "-o", out, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    from_dir = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 99, 17, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(from_dir(ids).logits, from_gguf(ids).logits, rtol=1e-5, atol=1e-5)
