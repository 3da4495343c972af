"""The read-ahead asks for every tensor byte once, in the order a layer walk reads them, and never fails a command."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from swtool import readahead
from swtool.errors import SwtoolError
from swtool.formats import open as formats_open
from swtool.formats.hf.header import layer_spans, read_shards


def sharded(directory, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, directory / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else 1 << 30


def test_spans_cover_every_tensor_once_in_layer_order(tmp_path):
    names = [f"model.layers.{layer}.{part}.weight" for layer in (0, 2, 10, 11) for part in ("mlp.down_proj", "self_attn.q_proj")]
    tensors = {name: torch.full((3, 5), float(i), dtype=torch.bfloat16) for i, name in enumerate(names)}
    tensors["model.embed_tokens.weight"] = torch.zeros(7, 5, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = torch.zeros(7, 5, dtype=torch.bfloat16)
    first = {n: tensors[n] for n in names[:5]} | {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}
    second = {n: t for n, t in tensors.items() if n not in first}
    sharded(tmp_path, {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second})
    spans = layer_spans(read_shards(tmp_path))
    needed = {n: t for n, t in tensors.items() if n != "model.embed_tokens.weight"}  # a separate head: only a few embedding rows are read
    assert sum(stop - start for _, start, stop in spans) == sum(t.numel() * 2 for t in needed.values())
    # each byte range maps back to tensors; the layers they hold never go backwards
    order = []
    for file, start, stop in spans:
        raw = file.read_bytes()
        header_end = 8 + int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:header_end])
        inside = [n for n, e in header.items() if n != "__metadata__" and start <= header_end + e["data_offsets"][0] < stop]
        order += sorted({layer_of(n) for n in inside})
    assert order == sorted(order)  # text order would put layer 10 before 2
    assert list(dict.fromkeys(order)) == [0, 2, 10, 11, 1 << 30]  # layer 10 spans both shards; the head last
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}, tied / "model.safetensors")
    assert sum(stop - start for _, start, stop in layer_spans(read_shards(tied))) == 7 * 5 * 2  # tied: the embedding is the head
    assert len(spans) < len(tensors)  # neighbours in a file are merged into one range


def test_a_gguf_file_is_one_range(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    asked = []
    monkeypatch.setattr(readahead, "ReadAhead", lambda spans: asked.append(spans))
    formats_open.prefetch(path)
    assert asked == [[(path, 0, 104)]]


def test_prefetch_hands_its_parsed_headers_to_the_reader(tmp_path, monkeypatch):
    """Format detection and the reader take the headers the read-ahead parsed: each file's header is read once."""
    save_file({"model.embed_tokens.weight": torch.zeros(7, 5)}, tmp_path / "model.safetensors")
    calls = []
    real = formats_open.read_shards
    monkeypatch.setattr(formats_open, "read_shards", lambda path: calls.append(path) or real(path))
    formats_open.prefetch(tmp_path).stop()
    assert formats_open._PARSED[tmp_path].entries.keys() == {"model.embed_tokens.weight"}
    try:
        formats_open._open(tmp_path)  # no config.json: the reader refuses it, but after taking the parsed headers
    except Exception:
        pass
    assert calls == [tmp_path] and tmp_path not in formats_open._PARSED


def test_unreadable_input_ends_the_thread_quietly(tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 20)  # a header length far past the file
    listed = tmp_path / "listed"
    listed.mkdir()
    header = b"[1, 2]"
    (listed / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # JSON, but not a header
    for model in (tmp_path, listed):
        ahead = formats_open.prefetch(model)  # a header the checks refuse reads nothing ahead; open reports it
        assert ahead.thread is None
    with pytest.raises(SwtoolError, match="no such file or directory"):  # answered at once, before torch is imported
        formats_open.prefetch(tmp_path / "missing")
    vanished = tmp_path / "vanished.gguf"
    ahead = readahead.start([(vanished, 0, 100)])  # a file gone by the time the thread opens it
    ahead.thread.join(timeout=10)
    assert not ahead.thread.is_alive()
    assert errors == []


def test_stop_ends_the_read_ahead(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(64 << 20))
    calls, release = [], threading.Event()

    def advise(descriptor, offset, length, advice):
        calls.append(offset)
        release.wait(10)  # hold the first call until stop() has been asked

    monkeypatch.setattr(readahead.os, "posix_fadvise", advise)
    ahead = readahead.start([(path, 0, 64 << 20)])
    ahead.stop()
    release.set()
    ahead.thread.join(timeout=10)
    assert not ahead.thread.is_alive() and len(calls) <= 1 < (64 << 20) // readahead.STEP_BYTES
