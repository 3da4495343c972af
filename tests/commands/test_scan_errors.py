"""swtool scan on bad input: one clear line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny.build("llama", directory)
    return directory


def run_scan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swtool.cli", "scan", *args], capture_output=True, text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("swtool: error: ")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def copy_model(good_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(good_model, target)
    return target


def test_good_model_scans(good_model):
    proc = run_scan(str(good_model), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["layers"]) == 4 and doc["architecture"] == "llama"


def test_missing_path():
    assert_user_error(run_scan("/nonexistent/model"), "no such file or directory")


def test_missing_config(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    (model / "config.json").unlink()
    assert_user_error(run_scan(str(model)), "no config.json")


def test_directory_without_weights(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    (model / "model.safetensors").unlink()
    assert_user_error(run_scan(str(model)), "no model.safetensors")


def test_unsupported_model_type_names_the_supported_ones(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(config))
    assert_user_error(run_scan(str(model)), "unsupported model_type 'gpt_neox'", "llama", "mistral")


def test_truncated_safetensors(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_user_error(run_scan(str(model)), "truncated")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    assert_user_error(run_scan(str(bad)), "model.gguf")


def test_index_naming_a_missing_shard(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    from swtool.formats.hf.header import read_header

    names = read_header(model / "model-00001-of-00002.safetensors")[0]
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_user_error(run_scan(str(model)), "model-00002-of-00002.safetensors", "does not exist")


def test_shapes_disagreeing_with_config(good_model, tmp_path):
    model = copy_model(good_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    assert_user_error(run_scan(str(model)), "shape", "gate_proj")


def test_pickle_checkpoint_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle_file = tmp_path / "pytorch_model.bin"
    pickle_file.write_bytes(b"\x80\x04cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    assert_user_error(run_scan(str(pickle_file)), "never unpickles", "safetensors")
    assert not marker.exists()


def test_several_models_give_json_lines_and_continue_past_a_bad_one(good_model):
    proc = run_scan(str(good_model), "/nonexistent/model", str(good_model), "--json")
    assert proc.returncode == 2
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 2 and all(d["architecture"] == "llama" for d in docs)
    assert "/nonexistent/model" in proc.stderr
