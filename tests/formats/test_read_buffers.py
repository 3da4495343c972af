"""The safetensors reader's file reads and the stream's reused buffers give the same tensors as before.

bench/scan_bench.py showed a scan through memory maps grew to the model's size
and spent more time in page faults than in conversion; these check that the
reads that replaced the maps, and the buffers the stream reuses, change no value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from swtool.detect import scan
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


def test_rows_and_whole_tensors_match_the_reference_loader(model_dir, tmp_path, monkeypatch):
    tensors = {"a": torch.randn(37, 5).to(torch.bfloat16), "b": torch.randn(9), "c": torch.arange(6, dtype=torch.int32)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    checkpoint = SafetensorsCheckpoint(tmp_path)
    for name, reference in tensors.items():
        assert torch.equal(checkpoint.load(name, reference.dtype), reference)
    a = tensors["a"]
    for rows in ([3, 4, 5, 9, 0, 0, 36], slice(5, 20), slice(30, None), np.array([2, 1]), [-1]):
        assert torch.equal(checkpoint.load("a", torch.bfloat16, rows=rows), a[torch.as_tensor(np.arange(37)[rows])])
    monkeypatch.setattr("swtool.formats.hf.reader.READ_BLOCK_BYTES", 16)  # many staging blocks per tensor
    checkpoint = SafetensorsCheckpoint(tmp_path)
    out = torch.empty(37, 5)
    assert checkpoint.load("a", torch.float32, out=out) is out
    assert torch.equal(out, a.float())
    assert checkpoint.load("a", torch.float32, out=torch.empty(5, 37)).shape == (37, 5)  # wrong shape: a new tensor
    same = torch.empty(37, 5, dtype=torch.bfloat16)  # stored as wanted: read straight into the buffer
    assert checkpoint.load("a", torch.bfloat16, out=same) is same and torch.equal(same, a)


def test_reused_buffers_and_the_prefetching_walk_give_the_same_layers(model_dir):
    checkpoint = open_checkpoint(model_dir)
    reference = load_file(model_dir / "model.safetensors")
    stream = LayerStream(checkpoint)
    first = stream.layer_weights(0)
    pointer = first["down"].data_ptr()
    second = stream.layer_weights(1, reuse=first)
    assert second["down"].data_ptr() == pointer and first == {}  # the buffers really are reused, and handed over
    assert torch.equal(second["down"], reference["model.layers.1.mlp.down_proj.weight"])
    pointers = []
    for layer, weights in stream.walk():  # the next layer loads on another thread while these are compared
        fresh = stream.layer_weights(layer)
        assert weights.keys() == fresh.keys() and all(torch.equal(weights[role], fresh[role]) for role in fresh)
        pointers.append(weights["down"].data_ptr())
    assert len(pointers) == checkpoint.config.num_layers >= 3
    assert pointers[2] == pointers[0] != pointers[1]  # two layers' buffers take turns
    assert [(c.layer, c.row, c.col) for c in scan(checkpoint).candidates] == [(1, 7, 40)]
