"""swtool quantize / dequantize end to end on a tiny llama with a planted super weight, to a swtool-rtn directory
and (--format gguf) to a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from swtool.cli import app
from tests.helpers.planted import DOWN, SUPER, planted_llama, scan_doc


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return planted_llama(tmp_path_factory.mktemp("src") / "model")


@pytest.fixture(scope="module")
def super_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.json"
    path.write_text(json.dumps(scan_doc()))
    return path


@pytest.fixture(scope="module")
def quantized(model, super_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q4"
    result = cli("quantize", model, "-o", out, "--super", super_json, "--block", "64", "-q")
    assert result.exit_code == 0, result.output
    return out


def metadata(directory: Path) -> dict[str, str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return f.metadata()


def test_layout_and_metadata(quantized, model):
    meta = metadata(quantized)
    assert meta["swtool.format"] == "swtool-rtn" and meta["swtool.format_version"] == "1"
    assert json.loads(meta["swtool.quant"]) == {"bits": 4, "block": 64, "sym": False, "clip": "none", "dtype": "float32"}
    assert json.loads(meta["swtool.super"]) == [{"tensor": DOWN, "row": 5, "col": 7, "value": 30.0}]
    inputs = json.loads(meta["swtool.inputs"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(inputs) and all(len(v) == 64 for v in inputs.values())
    assert json.loads(meta["swtool.options"])["bits"] == 4 and meta["swtool.source"] == str(model.resolve())
    with safe_open(str(quantized / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor(DOWN + ".qcodes").dtype == torch.uint8
        assert f.get_tensor(DOWN + ".qcodes").numel() == 64 * 128 // 2
        assert f.get_tensor(DOWN + ".qscale").dtype == torch.float16 and f.get_tensor(DOWN + ".qscale").numel() == 128
        assert f.get_tensor(DOWN + ".qshape").tolist() == [64, 128]
    assert DOWN not in names and "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.layers.0.input_layernorm.weight" in names and "model.layers.0.self_attn.q_proj.weight.qcodes" in names
    assert (quantized / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (quantized / "tokenizer.json").is_file()


def test_dequantize_loads_in_transformers_with_super_weight_restored(quantized, model, tmp_path):
    import transformers

    from swtool import load_state_dict

    out = tmp_path / "deq"
    result = cli("dequantize", quantized, "-o", out)
    assert result.exit_code == 0, result.output
    original = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    restored = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert restored.model.layers[1].mlp.down_proj.weight[5, 7].item() == 30.0
    for (name, a), (_, b) in zip(original.state_dict().items(), restored.state_dict().items()):
        half_step = a.abs().max() / 15 * 1.01  # 4-bit asymmetric: (max - min) / 15 / 2 at most
        assert (a - b).abs().max() <= (half_step if "proj" in name else 0), name
    lazy = load_state_dict(quantized)
    assert all(torch.equal(lazy[name], tensor) for name, tensor in restored.state_dict().items())
    fp16 = tmp_path / "deq16"
    assert cli("dequantize", quantized, "-o", fp16, "--dtype", "fp16").exit_code == 0
    assert json.loads((fp16 / "config.json").read_text())["torch_dtype"] == "float16"
    with safe_open(str(fp16 / "model.safetensors"), "pt") as f:
        assert f.get_tensor(DOWN).dtype == torch.float16


def test_keep_super_beats_plain_rtn(model, super_json, tmp_path):
    from swtool import load_state_dict

    assert cli("quantize", model, "-o", tmp_path / "plain", "--no-keep-super", "--block", "tensor", "-q").exit_code == 0
    assert cli("quantize", model, "-o", tmp_path / "kept", "--super", super_json, "--block", "tensor", "-q").exit_code == 0
    source = load_state_dict(model)
    plain, kept = load_state_dict(tmp_path / "plain"), load_state_dict(tmp_path / "kept")
    assert json.loads(metadata(tmp_path / "plain")["swtool.super"]) == []
    w = source[DOWN]
    assert (kept[DOWN] - w).abs().sum() < (plain[DOWN] - w).abs().sum() / 5


def test_same_input_same_bytes(model, super_json, tmp_path):
    for out in ("a", "b"):
        assert cli("quantize", model, "-o", tmp_path / out, "--super", super_json, "--clip", "auto", "--bits", "3", "-q").exit_code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_super_from_stdin_and_gguf_style_json_lines(model, quantized, tmp_path):
    line = json.dumps(scan_doc()) + "\n"
    assert cli("quantize", model, "-o", tmp_path / "q", "--super", "-", "--block", "64", "-q", input=line).exit_code == 0
    assert json.loads(metadata(tmp_path / "q")["swtool.super"]) == json.loads(metadata(quantized)["swtool.super"])
    assert json.loads(metadata(tmp_path / "q")["swtool.options"])["super"] == "-"


def test_quantized_directory_reads_as_a_checkpoint(quantized, model):
    from swtool import load_state_dict
    from swtool.detect import scan
    from swtool.formats.open import open_checkpoint

    checkpoint = open_checkpoint(quantized)
    assert checkpoint.format == "swtool-rtn" and checkpoint.stored_dtype(DOWN) == "RTN4"
    assert checkpoint.shape(DOWN) == (64, 128) and DOWN in checkpoint.names()
    assert float(checkpoint.load(DOWN)[5, 7]) == 30.0
    assert torch.equal(checkpoint.load(DOWN, rows=[5]), checkpoint.load(DOWN)[[5]])
    lazy = load_state_dict(quantized)
    assert set(lazy) == set(load_state_dict(model)) and lazy[DOWN].dtype == torch.float32
    result = scan(checkpoint)  # the forward runs on the dequantized tensors
    spikes = [c for c in result.candidates if (c.layer, c.row, c.col) == SUPER]
    assert spikes and spikes[0].tensor == DOWN


def test_shards_and_options(model, super_json, tmp_path):
    from swtool import load_state_dict

    out = tmp_path / "sharded"
    result = cli("quantize", model, "-o", out, "--super", super_json, "--bits", "8", "--sym", "--block", "channel",
                 "--include-embeddings", "--include-head", "--max-shard-size", "20KB", "-q")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight.qcodes" in index["weight_map"] and "lm_head.weight.qcodes" in index["weight_map"]
    assert index["metadata"]["swtool.format"] == "swtool-rtn"
    source, lazy = load_state_dict(model), load_state_dict(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight", DOWN):
        w = source[name]
        assert (lazy[name] - w).abs().max() <= w.abs().max() / 127 * 0.51 + 1e-6 or name == DOWN
    assert float(lazy[DOWN][5, 7]) == 30.0


def test_refuses_to_overwrite_and_force_replaces(model, super_json, quantized, tmp_path):
    before = (quantized / "model.safetensors").read_bytes()
    result = cli("quantize", model, "-o", quantized, "--super", super_json)
    assert result.exit_code == 2 and "already exists" in result.output
    assert (quantized / "model.safetensors").read_bytes() == before
    inside = cli("quantize", model, "-o", model / "q", "--super", super_json)
    assert inside.exit_code == 2 and "input" in inside.output and not (model / "q").exists()
    out = tmp_path / "f"
    out.mkdir()
    (out / "junk").write_text("x")
    assert cli("quantize", model, "-o", out, "--super", super_json, "--force", "-q").exit_code == 0
    assert not (out / "junk").exists() and (out / "model.safetensors").is_file()


def bad(tmp_path, *args, input=None):
    out = tmp_path / "out"
    result = cli(*args, "-o", out, input=input)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("swtool: error:"), result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "5"], "--bits 5"),
        (["--block", "0"], "--block 0"),
        (["--block", "-64"], "--block -64"),
        (["--clip", "z:-2"], "--clip"),
        (["--format", "gguf", "--type", "Q9_9"], "--type 'Q9_9'"),
        (["--format", "onnx"], "--format"),
    ],
)
def test_bad_options(model, super_json, tmp_path, args, message):
    assert message in bad(tmp_path, "quantize", model, "--super", super_json, *args)


@pytest.mark.parametrize(
    "doc, message",
    [
        (scan_doc(tensor="model.layers.9.mlp.down_proj.weight"), "not in"),
        (scan_doc(row=64), "outside"),
        (scan_doc(col=-1), "outside"),
        ({"model": "x"}, "super_weights"),
        ("[not json", "not JSON"),
    ],
)
def test_super_json_not_matching_the_model(model, tmp_path, doc, message):
    text = doc if isinstance(doc, str) else json.dumps(doc)
    assert message in bad(tmp_path, "quantize", model, "--super", "-", input=text)


def test_two_models_in_json_lines(model, tmp_path):
    text = json.dumps(scan_doc()) + "\n" + json.dumps(scan_doc()) + "\n"
    assert "2 models" in bad(tmp_path, "quantize", model, "--super", "-", input=text)


def test_quantized_input_refused(quantized, tmp_path):
    assert "already quantized" in bad(tmp_path, "quantize", quantized, "--no-keep-super")


def test_dequantize_refuses_non_swtool_input(model, tmp_path):
    assert "nor a swtool-quantized checkpoint" in bad(tmp_path, "dequantize", model)
    plain = tmp_path / "empty"
    plain.mkdir()
    assert "config.json" in bad(tmp_path, "dequantize", plain)


# -- --format gguf, and dequantize of a GGUF ----------------------------------------------------


def types_and_fields(path):
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}, {k: f.contents() for k, f in reader.fields.items()}


def test_quantize_gguf_keep_super(model, super_json, tmp_path):
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


def test_quantize_gguf_defaults_from_bits_and_super_type_f16(model, super_json, tmp_path):
    out = tmp_path / "m.gguf"
    assert cli("quantize", model, "-o", out, "--format", "gguf", "--bits", "8", "--super", super_json, "--super-type", "f16", "-q").exit_code == 0
    types, meta = types_and_fields(out)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert types[f"blk.{SUPER[0]}.ffn_down.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"


def test_fallback_is_said_on_stderr(tmp_path):
    from tests.helpers import tiny

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
def test_bad_gguf_options(model, super_json, tmp_path, args, message):
    assert message in bad(tmp_path, "quantize", model, "--super", super_json, *args)


def test_a_model_gguf_cannot_express_is_one_line_and_no_file(tmp_path):
    from tests.helpers import tiny

    tiny.build("gemma2", tmp_path / "g2")  # query_pre_attn_scalar 24; llama.cpp would scale by head_dim 16
    assert "query_pre_attn_scalar 24" in bad(tmp_path, "quantize", tmp_path / "g2", "--format", "gguf", "--type", "Q8_0", "--no-keep-super")


def test_dequantize_gguf_gives_transformers_the_same_logits(model, super_json, tmp_path):
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
