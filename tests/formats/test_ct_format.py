"""`swtool quantize --format compressed-tensors` and reading such directories, with the real consumer in the loop.

transformers + compressed-tensors (test dependencies) load swtool's output on CPU and must compute the
logits of the dequantized model swtool reads back; swtool must read the package's own output as the
package dequantizes it; and swtool's reader must work without the package installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import swtool
from swtool.cli import app
from tests.helpers.planted import DOWN, SUPER, planted_llama, scan_doc

PROMPT = torch.tensor([[1, 5, 9, 30, 200, 17, 3, 44, 91, 120]])
SCHEMES = {
    "int4-asym-group": ["--bits", "4", "--block", "32", "--asym"],
    "int4-sym-channel": ["--bits", "4", "--block", "channel", "--sym"],
    "int4-asym-channel": ["--bits", "4", "--block", "channel", "--asym"],
    "int4-sym-group": ["--bits", "4", "--block", "16", "--sym"],
    "int8-asym-group": ["--bits", "8", "--block", "64", "--asym"],
    "int8-sym-channel": ["--bits", "8", "--block", "channel", "--sym"],
    "int3-asym-group": ["--bits", "3", "--block", "32", "--asym"],
    "fp8": ["--bits", "fp8"],
}


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return planted_llama(tmp_path_factory.mktemp("src") / "model")


@pytest.fixture(scope="module")
def super_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.json"
    path.write_text(json.dumps(scan_doc()))
    return path


@pytest.fixture(scope="module")
def outputs(model, super_json, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct")
    made = {}
    for name, options in SCHEMES.items():
        result = cli("quantize", model, "-o", root / name, "--format", "compressed-tensors", "--super", super_json, "-q", *options)
        assert result.exit_code == 0, result.output
        made[name] = root / name
    return made


def quantization_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def load_transformers(directory: Path):
    """transformers' own loading. Asymmetric pack-quantized checkpoints (the package's own too) do not load through
    transformers 5.25's default route, which expects unpacked zero points; dequantize=True is its documented route."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    asymmetric = not quantization_config(directory)["config_groups"]["group_0"]["weights"]["symmetric"]
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    return AutoModelForCausalLM.from_pretrained(directory, **extra).eval()


def logits_of_read_back(model: Path, directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model).eval()
    state = swtool.load_state_dict(directory)
    missing, unexpected = reference.load_state_dict({k: state[k].float() for k in state}, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    with torch.no_grad():
        return reference(PROMPT).logits


@pytest.mark.parametrize("scheme", ["int4-asym-group", "int4-sym-channel", "int4-asym-channel", "int8-asym-group", "int8-sym-channel", "fp8"])
def test_transformers_computes_what_swtool_reads_back(outputs, model, scheme):
    pytest.importorskip("compressed_tensors")
    loaded = load_transformers(outputs[scheme])
    with torch.no_grad():
        theirs = loaded(PROMPT).logits.float()
    ours = logits_of_read_back(model, outputs[scheme])
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4), float((theirs - ours).abs().max())


def test_layout_config_and_super_weight_module(outputs, model):
    directory = outputs["int4-asym-group"]
    config = quantization_config(directory)
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 32, "strategy": "group", "dynamic": False}
    module = DOWN.removesuffix(".weight")
    assert module in config["ignore"] and "lm_head" in config["ignore"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f, safe_open(str(model / "model.safetensors"), "pt") as src:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor(DOWN), src.get_tensor(DOWN))  # the super weight's module, exact in the source dtype
        assert f"{module}.weight_packed" not in keys
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.weight_packed").shape == (64, 8) and f.get_tensor(f"{q}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{q}.weight_scale").shape == (64, 2) and f.get_tensor(f"{q}.weight_scale").dtype == torch.float32
        assert f.get_tensor(f"{q}.weight_zero_point").shape == (8, 2) and f.get_tensor(f"{q}.weight_zero_point").dtype == torch.int32
        assert f.get_tensor(f"{q}.weight_shape").tolist() == [64, 64]
        meta = f.metadata()
    assert json.loads(meta["swtool.super"]) == [{"tensor": DOWN, "row": SUPER[1], "col": SUPER[2], "value": 30.0}]
    assert json.loads(meta["swtool.quant"])["bits"] == 4 and "swtool.inputs" in meta
    fp8 = outputs["fp8"]
    assert quantization_config(fp8)["format"] == "float-quantized"
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape == (128, 1)


def test_config_validates_against_the_package(outputs):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    for directory in outputs.values():
        written = quantization_config(directory)
        parsed = QuantizationConfig.model_validate(written)
        dumped = parsed.model_dump()
        for key in ("format", "quantization_status", "ignore"):
            assert dumped[key] == written[key]
        assert dumped["config_groups"]["group_0"]["weights"] == written["config_groups"]["group_0"]["weights"]


def test_fused_siblings_of_a_super_weight_stay_unquantized(model, tmp_path):
    doc = {"model": "x", "super_weights": [{"layer": 0, "tensor": "model.layers.0.mlp.up_proj.weight", "row": 3, "col": 4}], "candidates": []}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    result = cli("quantize", model, "-o", tmp_path / "q", "--format", "compressed-tensors", "--super", tmp_path / "s.json", "--bits", "4", "--block", "channel")
    assert result.exit_code == 0, result.output
    ignore = quantization_config(tmp_path / "q")["ignore"]
    assert "model.layers.0.mlp.up_proj" in ignore and "model.layers.0.mlp.gate_proj" in ignore and "model.layers.0.mlp.down_proj" not in ignore
    assert "vLLM fuses" in result.output


def test_no_keep_super_quantizes_that_module_too(model, tmp_path):
    result = cli("quantize", model, "-o", tmp_path / "q", "--format", "compressed-tensors", "--no-keep-super", "--bits", "4", "--block", "32", "-q")
    assert result.exit_code == 0, result.output
    assert quantization_config(tmp_path / "q")["ignore"] == ["lm_head"]


def test_deterministic_bytes(model, super_json, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = cli("quantize", model, "-o", tmp_path / name, "--format", "compressed-tensors", "--super", super_json, "--bits", "3", "--block", "32", "-q")
        assert result.exit_code == 0, result.output
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert runs[0] == runs[1] and "model.safetensors" in runs[0] and "tokenizer.json" in runs[0]


def test_sharded_with_an_index(model, super_json, tmp_path):
    result = cli("quantize", model, "-o", tmp_path / "q", "--format", "compressed-tensors", "--super", super_json, "--bits", "4", "--block", "32", "--max-shard-size", "100KB", "-q")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.self_attn.q_proj.weight_packed" in index["weight_map"]
    assert torch.equal(swtool.load_state_dict(tmp_path / "q")[DOWN], swtool.load_state_dict(tmp_path / "q")[DOWN])


# ---- reading what the package itself wrote ------------------------------------------------------


PACKAGE_SCHEMES = {
    "int4-asym-group": dict(num_bits=4, symmetric=False, strategy="group", group_size=32),
    "int4-sym-channel": dict(num_bits=4, symmetric=True, strategy="channel"),
    "int3-asym-channel": dict(num_bits=3, symmetric=False, strategy="channel"),
    "int8-sym-group": dict(num_bits=8, symmetric=True, strategy="group", group_size=64),
    "fp8-channel": dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
}


def package_checkpoint(directory: Path, weights: dict) -> dict[str, torch.Tensor]:
    """A tiny model quantized and saved by compressed-tensors' own compressor; returns the package's own
    dequantized weights (its ModelCompressor.decompress_model) for comparison."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    from tests.helpers import tiny

    model = tiny.build("llama", directory).half()
    args = QuantizationArgs(**weights)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            w = module.weight.data.float()
            blocks = w.view(w.shape[0], -1, args.group_size) if args.strategy == "group" else w[:, None, :]
            scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    for old in directory.glob("*.safetensors"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(str(directory))
    compressor.decompress_model(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")}


@pytest.mark.parametrize("scheme", list(PACKAGE_SCHEMES))
def test_reads_the_package_output_as_the_package_does(tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    expected = package_checkpoint(tmp_path / "pkg", PACKAGE_SCHEMES[scheme])
    state = swtool.load_state_dict(tmp_path / "pkg")
    quantized = [k for k in state if k.endswith("_proj.weight")]
    assert len(quantized) == 28
    for name in quantized:
        ours = state[name]
        assert ours.dtype == expected[name].dtype == torch.float16, name
        assert torch.equal(ours, expected[name]), name


def test_reader_needs_no_package(outputs, tmp_path):
    """swtool's reader in a process where `import compressed_tensors` fails."""
    directory = outputs["int3-asym-group"]
    expected = {name: float(t.double().sum()) for name, t in swtool.load_state_dict(directory).items()}
    code = (
        "import sys, json; sys.modules['compressed_tensors'] = None\n"
        "import swtool\n"
        f"state = swtool.load_state_dict({str(directory)!r})\n"
        "print(json.dumps({k: float(v.double().sum()) for k, v in state.items()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


# ---- the other commands on a compressed-tensors directory ----------------------------------------


def test_scan_finds_the_planted_weight(outputs):
    """A tiny random model shows no perplexity effect (its verdict is noise), so the scan's search path is what
    is checked: the planted weight is the strongest candidate, at its exact coordinates, read from the int4 file."""
    result = cli("scan", outputs["int4-asym-group"], "--json")
    assert result.exit_code == 0, result.output
    candidates = json.loads(result.stdout)["candidates"]
    strongest = max(candidates, key=lambda c: c["effect"] or 0)
    assert (strongest["tensor"], strongest["row"], strongest["col"]) == (DOWN, SUPER[1], SUPER[2])
    assert strongest["ppl_ratio"] is not None  # verified (ratio noise on a random model), not skipped


def test_dequantize_and_eval(outputs, tmp_path):
    directory = outputs["int4-asym-channel"]
    result = cli("dequantize", directory, "-o", tmp_path / "dq")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dq" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    state, plain = swtool.load_state_dict(directory), swtool.load_state_dict(tmp_path / "dq")
    assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in state)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    ppl = [json.loads(cli("eval", d, "--text", text, "--ctx", "64", "--max-windows", "2", "--json", "-q").stdout)["ppl"] for d in (directory, tmp_path / "dq")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_requantize_to_swtool_rtn(outputs, tmp_path):
    result = cli("quantize", outputs["fp8"], "-o", tmp_path / "rtn", "--no-keep-super", "--bits", "8", "--block", "64", "-q")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "rtn" / "config.json").read_text())
    with safe_open(str(tmp_path / "rtn" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["swtool.quant"])["dtype"] == "float32"  # the source's (its scales'), not a fallback
    a, b = swtool.load_state_dict(outputs["fp8"]), swtool.load_state_dict(tmp_path / "rtn")
    name = "model.layers.2.mlp.up_proj.weight"
    assert (a[name].float() - b[name].float()).abs().max() < 0.01 * a[name].float().abs().max()


def test_edit_reaches_the_unquantized_super_weight_module(outputs, super_json, tmp_path):
    directory = outputs["int4-asym-group"]
    result = cli("edit", directory, "-o", tmp_path / "e", "--zero-super", "--super", super_json)
    assert result.exit_code == 0, result.output
    edited, before = swtool.load_state_dict(tmp_path / "e"), swtool.load_state_dict(directory)
    assert float(edited[DOWN][SUPER[1], SUPER[2]]) == 0.0 and float(before[DOWN][SUPER[1], SUPER[2]]) == 30.0
    assert torch.equal(edited["model.layers.2.mlp.down_proj.weight"], before["model.layers.2.mlp.down_proj.weight"])
    assert quantization_config(tmp_path / "e") == quantization_config(directory)
    refused = cli("edit", directory, "-o", tmp_path / "e2", "--zero-outliers", "3")
    assert refused.exit_code == 2 and "stored quantized" in refused.output and not (tmp_path / "e2").exists()


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------


def bad(tmp_path: Path, model: Path, *args: str) -> str:
    out = tmp_path / "out"
    result = cli("quantize", model, "-o", out, "--format", "compressed-tensors", "--no-keep-super", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("swtool: error:"), result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "src"]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--block", "48"], "--block 48: does not divide the row length"),
        (["--bits", "5"], "--bits 5"),
        (["--bits", "fp9"], "--bits 'fp9'"),
        (["--block", "tensor"], "not tensor"),
        (["--include-embeddings"], "--include-embeddings"),
        (["--bits", "fp8", "--clip", "z:3"], "integer widths only"),
    ],
)
def test_bad_options(model, tmp_path, args, message):
    assert message in bad(tmp_path, model, *args)


def test_block_error_lists_the_valid_choices(model, tmp_path):
    assert "2, 4, 8, 16, 32, 64 or channel" in bad(tmp_path, model, "--block", "48")


def test_fp8_only_for_compressed_tensors(model, tmp_path):
    result = cli("quantize", model, "-o", tmp_path / "x", "--bits", "fp8")
    assert result.exit_code == 2 and "compressed-tensors only" in result.output and not (tmp_path / "x").exists()


def test_a_model_without_quantizable_tensors(tmp_path):
    """One layer whose every module holds a super weight (q/k/v and gate/up are kept together): nothing left to quantize."""
    from tests.helpers import tiny

    source = tmp_path / "src"
    tiny.build("llama", source, num_hidden_layers=1)
    layer = "model.layers.0"
    doc = {"model": "x", "super_weights": [
        {"layer": 0, "tensor": f"{layer}.{module}.weight", "row": 1, "col": 2}
        for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ], "candidates": []}
    (source / "scan.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    result = cli("quantize", source, "-o", out, "--format", "compressed-tensors", "--super", source / "scan.json", "--bits", "4", "--block", "32")
    assert result.exit_code == 2 and not out.exists(), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no quantizable tensor" in lines[0]


def test_damaged_checkpoint_is_one_line(outputs, tmp_path):
    """A weight_shape that disagrees with the packed codes is refused with the module's name, not a traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(outputs["int4-sym-channel"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight_shape"] = torch.tensor([64, 96])
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = cli("dequantize", broken, "-o", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.layers.0.self_attn.q_proj" in lines[0], result.output
