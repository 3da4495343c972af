"""The one provenance record every writer stores: version, command, options, sha256 of each input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from swtool import __version__
from swtool.provenance import CHUNK, provenance, sha256_file


def model_dir(root: Path) -> Path:
    model = root / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    (model / "sub" / "extra.json").write_text("{}")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    return model


def test_fields_and_values(tmp_path):
    model = model_dir(tmp_path)
    scan = tmp_path / "scan.json"
    scan.write_text('{"super_weights": []}')
    record = provenance("quantize", {"bits": 4, "block": 512, "super": scan, "clip": None}, [model, scan])
    assert set(record) == {"swtool.version", "swtool.command", "swtool.options", "swtool.inputs"}
    assert all(isinstance(v, str) for v in record.values())
    assert record["swtool.version"] == __version__
    assert record["swtool.command"] == "quantize"
    assert json.loads(record["swtool.options"]) == {"bits": 4, "block": 512, "super": str(scan), "clip": None}
    inputs = json.loads(record["swtool.inputs"])
    assert list(inputs) == ["m/config.json", "m/model.safetensors", "m/sub/extra.json", "scan.json"]  # no hidden files, no pickles
    assert inputs["m/model.safetensors"] == hashlib.sha256(bytes(range(256)) * 10).hexdigest()
    assert inputs["scan.json"] == hashlib.sha256(b'{"super_weights": []}').hexdigest()


def test_same_input_and_options_give_the_same_record(tmp_path):
    """Nothing depends on the time, the input's location or the options' order: outputs stay byte-identical."""
    first = provenance("edit", {"zero_super": True, "scale": 1.5}, [model_dir(tmp_path / "a")])
    second = provenance("edit", {"scale": 1.5, "zero_super": True}, [model_dir(tmp_path / "b")])
    assert first == second
    (tmp_path / "b" / "m" / "config.json").write_text('{"model_type": "mistral"}')
    assert provenance("edit", {"scale": 1.5, "zero_super": True}, [tmp_path / "b" / "m"]) != first


def test_large_files_are_hashed_in_chunks(tmp_path):
    data = bytes(range(251)) * (3 * CHUNK // 251 + 7)
    path = tmp_path / "big.gguf"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert json.loads(provenance("scan", {}, [path])["swtool.inputs"]) == {"big.gguf": hashlib.sha256(data).hexdigest()}
