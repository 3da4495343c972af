"""The safetensors reader's maps and reads, and the stream's reused buffers, give the same tensors as the reference loader.

A tensor wanted in its stored dtype is a private map of its file (no copy), a
converted one is converted straight from such a map into a reused buffer, and
rows are read; these check that no path changes a value, that a map never writes
the file, and that the stream keeps only the buffers it really refills.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from swtool.detect import scan
from swtool.errors import SwtoolError
from swtool.formats.hf.reader import SafetensorsCheckpoint
from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream
from tests.helpers.tiny import build, plant


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = build("llama", directory)
    plant(model, directory, [(1, 7, 40)])
    return directory


@pytest.fixture(scope="module")
def bf16_dir(model_dir, tmp_path_factory):
    """The same model stored in bf16, so that a float32 stream converts (and refills) every matrix."""
    directory = tmp_path_factory.mktemp("tiny-llama-bf16")
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(model_dir / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        (directory / name).write_text((model_dir / name).read_text())
    return directory


def test_rows_and_whole_tensors_match_the_reference_loader(model_dir, tmp_path):
    tensors = {"a": torch.randn(37, 5).to(torch.bfloat16), "b": torch.randn(9), "c": torch.arange(6, dtype=torch.int32)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    checkpoint = SafetensorsCheckpoint(tmp_path)
    for name, reference in tensors.items():
        assert torch.equal(checkpoint.load(name, reference.dtype), reference)
    a = tensors["a"]
    for rows in ([3, 4, 5, 9, 0, 0, 36], slice(5, 20), slice(30, None), np.array([2, 1]), [-1]):
        assert torch.equal(checkpoint.load("a", torch.bfloat16, rows=rows), a[torch.as_tensor(np.arange(37)[rows])])
    out = torch.empty(37, 5)
    assert checkpoint.refills("a", torch.float32) and checkpoint.load("a", torch.float32, out=out) is out
    assert torch.equal(out, a.float())
    assert checkpoint.load("a", torch.float32, out=torch.empty(5, 37)).shape == (37, 5)  # wrong shape: a new tensor
    same = torch.empty(37, 5, dtype=torch.bfloat16)  # stored as wanted: mapped, the buffer is not used
    assert not checkpoint.refills("a", torch.bfloat16)
    mapped = checkpoint.load("a", torch.bfloat16, out=same)
    assert mapped is not same and torch.equal(mapped, a)


def test_a_map_never_writes_the_file(tmp_path, model_dir):
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    before = (tmp_path / "model.safetensors").read_bytes()
    mapped = SafetensorsCheckpoint(tmp_path).load("w")
    mapped.mul_(-1)  # copy on write: the caller's own pages change, the file's do not
    assert float(mapped[2, 3]) == -11
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert torch.equal(SafetensorsCheckpoint(tmp_path).load("w"), torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_a_file_truncated_after_opening_is_a_user_error(tmp_path, model_dir):
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    checkpoint = SafetensorsCheckpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SwtoolError, match="truncated"):
        checkpoint.load("w")


def test_reused_buffers_and_the_prefetching_walk_give_the_same_layers(bf16_dir):
    checkpoint = open_checkpoint(bf16_dir)
    reference = load_file(bf16_dir / "model.safetensors")
    stream = LayerStream(checkpoint)
    stream.expect_rows(1000)  # many rows: matrices convert to float32, into reused buffers
    first = stream.layer_weights(0)
    pointer = first["down"].data_ptr()
    second = stream.layer_weights(1, reuse=first)
    assert second["down"].data_ptr() == pointer and first == {}  # the buffers really are reused, and handed over
    assert torch.equal(second["down"], reference["model.layers.1.mlp.down_proj.weight"].float())
    pointers = []
    for layer, weights in stream.walk():  # the next layer loads on another thread while these are compared
        fresh = stream.layer_weights(layer)
        assert weights.keys() == fresh.keys() and all(torch.equal(weights[role], fresh[role]) for role in fresh)
        pointers.append(weights["down"].data_ptr())
    assert len(pointers) == checkpoint.config.num_layers >= 3
    assert pointers[2] == pointers[0] != pointers[1]  # two layers' buffers take turns
    assert [(c.layer, c.row, c.col) for c in scan(checkpoint).candidates] == [(1, 7, 40)]


def test_mapped_layers_are_let_go_not_handed_back(model_dir, monkeypatch):
    """Stored as computed (float32): each layer is mapped afresh, so the walk hands the loads no buffer of the
    previous layer (which would only stay alive, mapped, while the next layer loads)."""
    checkpoint = open_checkpoint(model_dir)
    reference = load_file(model_dir / "model.safetensors")
    stream = LayerStream(checkpoint)
    assert not checkpoint.refills("model.layers.0.mlp.down_proj.weight", torch.float32)
    handed = []
    load = checkpoint.load

    def spy(name, dtype=torch.float32, rows=None, out=None, checked=True):
        handed.append(out)
        return load(name, dtype, rows, out, checked)

    monkeypatch.setattr(checkpoint, "load", spy)
    for layer, weights in stream.walk():
        assert torch.equal(weights["down"], reference[f"model.layers.{layer}.mlp.down_proj.weight"])
    assert len(handed) > checkpoint.config.num_layers and all(out is None for out in handed)
