"""swtool edit: zero and scale exactly the super weights, prune other outliers, a checkpoint transformers loads."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from swtool.ablation import EditPlan, edit_tensor
from swtool.cli import app
from swtool.families import linear_layers
from swtool.formats.base import Held
from swtool.formats.open import open_checkpoint

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny llama in bf16 with a planted super weight at layer 1 [5, 7], and scan-style JSON naming it."""
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("edit-src")
    model = tiny.build("llama", directory)
    tiny.plant(model, directory, [(1, 5, 7)])
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    scan_json = directory.parent / "scan.json"
    scan_json.write_text(json.dumps({"model": str(directory), "super_weights": [{"layer": 1, "tensor": DOWN, "row": 5, "col": 7}]}))
    return directory, scan_json


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def test_zero_super_zeroes_exactly_that_weight(source, tmp_path):
    directory, scan_json = source
    out = tmp_path / "zeroed"
    result = run("edit", directory, "-o", out, "--zero-super", "--super", scan_json)
    assert result.exit_code == 0, result.output
    before, after = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    for name in before:
        assert after[name].dtype == before[name].dtype == torch.bfloat16
        changed = (after[name] != before[name]).nonzero().tolist()
        assert changed == ([[5, 7]] if name == DOWN else []), name
    assert before[DOWN][5, 7] == 30.0 and after[DOWN][5, 7] == 0.0
    assert (out / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()


def test_output_loads_in_transformers_with_provenance(source, tmp_path):
    import transformers

    directory, scan_json = source
    out = tmp_path / "scaled"
    result = run("edit", directory, "-o", out, "--scale-super", "2", "--super", "-", input=scan_json.read_text())
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].mlp.down_proj.weight.detach()[5, 7].item() == 60.0
    with safe_open(out / "model.safetensors", "pt") as fh:
        meta = fh.metadata()
    from swtool import __version__

    assert meta["swtool.version"] == __version__
    assert meta["swtool.command"] == "edit"
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads(meta["swtool.inputs"])["model.safetensors"] == digest
    assert json.loads(meta["swtool.options"])["scale_super"] == 2.0
    again = tmp_path / "again"
    run("edit", directory, "-o", again, "--scale-super", "2", "--super", scan_json)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()  # deterministic


def test_zero_outliers_skips_the_super_weights(source, tmp_path):
    directory, scan_json = source
    out = tmp_path / "outliers"
    result = run("edit", directory, "-o", out, "--zero-outliers", "3", "--super", scan_json)
    assert result.exit_code == 0, result.output
    before, after = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    linear = linear_layers(open_checkpoint(directory).config)
    assert len(linear) == 4 * 7
    for name in before:
        changed = (after[name] != before[name]).nonzero().tolist()
        if name not in linear:
            assert changed == [], name
            continue
        assert len(changed) == 3 and all(after[name][r, c] == 0 for r, c in changed)
        magnitude = before[name].float().abs()
        if name == DOWN:
            assert after[name][5, 7] == 30.0
            magnitude[5, 7] = 0
        threshold = magnitude.flatten().topk(3).values.min()
        assert all(magnitude[r, c] >= threshold for r, c in changed)


def test_edit_tensor_combines_pruning_and_scaling():
    weight = torch.tensor([[1.0, -9.0, 2.0], [8.0, 0.5, -3.0]])
    plan = EditPlan((Held("w", 0, 1),), scale_super=0.5, zero_outliers=2)
    out = edit_tensor(plan, "w", weight, is_linear=True)
    assert out.tolist() == [[1.0, -4.5, 2.0], [0.0, 0.5, 0.0]]
    assert weight[0, 1] == -9.0  # the input is not modified


def test_user_errors_leave_nothing(source, tmp_path):
    directory, scan_json = source
    out = tmp_path / "nothing"
    for args, message in [
        ((), "nothing to do"),
        (("--zero-super", "--scale-super", "2"), "exclude each other"),
        (("--zero-super", "--super", tmp_path / "missing.json"), "no such file"),
    ]:
        result = run("edit", directory, "-o", out, *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"super_weights": [{"layer": 1, "tensor": DOWN, "row": 64, "col": 7}]}))
    result = run("edit", directory, "-o", out, "--zero-super", "--super", bad)
    assert result.exit_code == 2 and "outside" in result.output
    out.mkdir()
    result = run("edit", directory, "-o", out, "--zero-super", "--super", scan_json)
    assert result.exit_code == 2 and "already exists" in result.output


def test_side_files_are_copied_but_stale_pickled_weights_are_not(source, tmp_path):
    import shutil

    directory, scan_json = source
    model = tmp_path / "model"
    shutil.copytree(directory, model)
    (model / "pytorch_model.bin").write_bytes(b"unedited pickled weights")
    (model / "generation_config.json").write_text("{}")
    out = tmp_path / "zeroed"
    result = run("edit", model, "-o", out, "--zero-super", "--super", scan_json)
    assert result.exit_code == 0, result.output
    assert (out / "generation_config.json").read_text() == "{}"
    assert (out / "config.json").is_file() and not (out / "pytorch_model.bin").exists()
