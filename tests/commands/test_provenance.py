"""The one provenance record every writer stores: version, command, options, sha256 of each input,
hashed on a thread while the output is written and sealed into it afterwards."""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import time
from pathlib import Path

import pytest

from swtool import __version__, digests
from swtool.errors import SwtoolError
from swtool.digests import sha256_file
from swtool.provenance import Provenance, record


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


def safetensors_with(path: Path, metadata: dict[str, str], data: bytes) -> None:
    """A safetensors file holding `metadata` and one uint8 tensor of `data`."""
    header = json.dumps({"__metadata__": metadata, "t": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_fields_and_values(tmp_path):
    model = model_dir(tmp_path)
    scan = tmp_path / "scan.json"
    scan.write_text('{"super_weights": []}')
    with Provenance("quantize", {"bits": 4, "block": 512, "super": scan, "clip": None}, [model, scan], {"-": "ab" * 32}) as made:
        fields, digests = made.fields, made.digests()
    assert set(fields) == {"swtool.version", "swtool.command", "swtool.options", "swtool.inputs"}
    assert all(isinstance(v, str) for v in fields.values())
    assert fields["swtool.version"] == __version__
    assert fields["swtool.command"] == "quantize"
    assert json.loads(fields["swtool.options"]) == {"bits": 4, "block": 512, "super": str(scan), "clip": None}
    assert list(json.loads(fields["swtool.inputs"])) == ["-", "m/config.json", "m/model.safetensors", "m/sub/extra.json", "scan.json"]  # no hidden files, no pickles
    assert digests["m/model.safetensors"] == hashlib.sha256(bytes(range(256)) * 10).hexdigest()
    assert digests["scan.json"] == hashlib.sha256(b'{"super_weights": []}').hexdigest()
    assert digests["-"] == "ab" * 32
    assert record("quantize", {"bits": 4, "block": 512, "super": str(scan), "clip": None}, digests)["swtool.inputs"] == json.dumps(digests, sort_keys=True, separators=(",", ":"))


def test_same_input_and_options_give_the_same_record(tmp_path):
    """Nothing depends on the time, the input's location or the options' order: outputs stay byte-identical."""
    def sealed(model: Path, options: dict) -> bytes:
        out = model.parent / "out.safetensors"
        with Provenance("edit", options, [model]) as made:
            safetensors_with(out, made.fields, b"\0" * 64)
            made.seal(out)
        return out.read_bytes()

    first = sealed(model_dir(tmp_path / "a"), {"zero_super": True, "scale": 1.5})
    assert first == sealed(model_dir(tmp_path / "b"), {"scale": 1.5, "zero_super": True})
    (tmp_path / "b" / "m" / "config.json").write_text('{"model_type": "mistral"}')
    assert sealed(tmp_path / "b" / "m", {"scale": 1.5, "zero_super": True}) != first


def test_seal_puts_the_digests_into_every_file_of_the_output(tmp_path):
    """Stand-ins in safetensors headers, a JSON index (a JSON string inside JSON) and a GGUF-like file's strings:
    all replaced, nothing else changed, no stand-in left anywhere, not even in tensor data that happens to hold one."""
    model = model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with Provenance("quantize", {"bits": 4}, [model]) as made:
        stand_in = json.loads(made.fields["swtool.inputs"])["m/model.safetensors"].encode()
        safetensors_with(out / "model-00001-of-00002.safetensors", made.fields, stand_in)  # tensor data equal to a stand-in: left alone
        safetensors_with(out / "model-00002-of-00002.safetensors", made.fields, b"\1" * 8)
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": made.fields}, indent=2))
        (out / "file.gguf").write_bytes(b"GGUF" + made.fields["swtool.inputs"].encode() + b"\0" * 100)
        (out / "config.json").write_text("{}")
        before = {p.name: p.stat().st_size for p in out.iterdir()}
        made.seal(out)
    expected = json.dumps(made.digests(), sort_keys=True, separators=(",", ":"))
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        raw = (out / shard).read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]])
        assert header["__metadata__"]["swtool.inputs"] == expected
    assert (out / "model-00001-of-00002.safetensors").read_bytes().endswith(stand_in)
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["swtool.inputs"] == expected
    assert (out / "file.gguf").read_bytes() == b"GGUF" + expected.encode() + b"\0" * 100
    assert (out / "config.json").read_text() == "{}"


def test_seal_refuses_an_output_without_the_record(tmp_path):
    model = model_dir(tmp_path)
    (tmp_path / "out.gguf").write_bytes(b"GGUF nothing recorded")
    with Provenance("edit", {}, [model]) as made, pytest.raises(SwtoolError, match="records no provenance"):
        made.seal(tmp_path / "out.gguf")


def test_large_files_are_hashed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CHUNK", mmap.ALLOCATIONGRANULARITY)
    data = bytes(range(251)) * (3 * mmap.ALLOCATIONGRANULARITY // 251 + 7)
    path = tmp_path / "big.gguf"
    path.write_bytes(data)
    (tmp_path / "empty.json").write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "empty.json") == hashlib.sha256(b"").hexdigest()
    with Provenance("scan", {}, [path]) as made:
        assert made.digests() == {"big.gguf": hashlib.sha256(data).hexdigest()}


def test_an_unreadable_input_is_one_line_when_the_digests_are_needed(tmp_path):
    model = model_dir(tmp_path)
    with Provenance("quantize", {}, [model, tmp_path / "gone.json"]) as made:  # listed, then gone before it is hashed
        with pytest.raises(SwtoolError, match=r"^cannot read an input to record its sha256: No such file or directory: .*gone\.json$"):
            made.digests()


def test_leaving_without_sealing_stops_the_hashing(tmp_path, monkeypatch):
    """A command that fails early does not wait for (or keep reading) a model it will not record."""
    monkeypatch.setattr(digests, "CHUNK", mmap.ALLOCATIONGRANULARITY)
    path = tmp_path / "big.bin"
    with path.open("wb") as fh:  # sparse: two million maps and hashlib calls (many seconds, unless stopped), no disk
        fh.truncate(2_000_000 * mmap.ALLOCATIONGRANULARITY)
    with Provenance("quantize", {}, [path]) as made:
        time.sleep(0.05)
    with pytest.raises(digests.Cancelled):
        made.digests()


def test_the_same_file_is_hashed_once(tmp_path):
    """The command line asks for the weights' digests before torch is imported; the record reuses that work."""
    model = model_dir(tmp_path)
    early = digests.sha256_later([model / "model.safetensors"])[model / "model.safetensors"]
    with Provenance("quantize", {}, [model]) as made:
        assert made._futures["m/model.safetensors"] is early
        made.digests()
    (model / "model.safetensors").write_bytes(b"changed")
    with Provenance("quantize", {}, [model]) as made:
        assert made.digests()["m/model.safetensors"] == hashlib.sha256(b"changed").hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The digest cache in a temporary file, and this process's memory of digests emptied: each
    `sha256_later` after a `new_process()` behaves as a new run of swtool would."""
    file = tmp_path / "cache" / "sha256.json"
    monkeypatch.setattr(digests, "cache_file", lambda: file)
    monkeypatch.setattr(digests, "_jobs", {})
    return file


def new_process(monkeypatch) -> None:
    monkeypatch.setattr(digests, "_jobs", {})


def test_digests_are_remembered_across_runs_until_the_file_changes(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digests, "SETTLED_S", 0.0)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    assert digests.sha256_later([path])[path].result() == hashlib.sha256(b"first").hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [hashlib.sha256(b"first").hexdigest()]

    new_process(monkeypatch)
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda *_: pytest.fail("hashed again"))
    assert digests.sha256_later([path])[path].result() == hashlib.sha256(b"first").hexdigest()

    new_process(monkeypatch)
    monkeypatch.setattr(digests, "sha256_file", real)
    path.write_bytes(b"other")  # same size: the times and the status change tell
    assert digests.sha256_later([path])[path].result() == hashlib.sha256(b"other").hexdigest()


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path, cache):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"fresh")
    assert digests.sha256_later([path])[path].result() == hashlib.sha256(b"fresh").hexdigest()
    assert not cache.exists() or json.loads(cache.read_text()) == {}


def test_a_damaged_cache_is_ignored(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digests, "SETTLED_S", 0.0)
    cache.parent.mkdir(parents=True)
    cache.write_text('{"not": "a digest", ')
    path = tmp_path / "weights.bin"
    path.write_bytes(b"data")
    assert digests.sha256_later([path])[path].result() == hashlib.sha256(b"data").hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [hashlib.sha256(b"data").hexdigest()]
