"""safetensors headers, parsed and checked once, without torch.

We parse and check the header ourselves (it is 8 bytes of length and a JSON document)
instead of trusting it: files come from strangers, and a hostile header must produce a
clear error, not an allocation of gigabytes. The reader, format detection and the
read-ahead (which runs while torch imports) all take what this parsed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from swtool.errors import SwtoolError
from swtool.formats.dtypes import STORAGE
from swtool.formats.pickles import PICKLE_SUFFIXES, pickle_refusal

HEADER_CAP = 100 * 1024 * 1024
"""The safetensors format refuses headers larger than 100 MB; so do we."""



SHARD_PATTERN = re.compile(r".*-\d+-of-\d+\.safetensors$")

JSON_ITEMS_CAP = 1_000_000
"""Most JSON values (counted as commas and opening brackets, before parsing) in a header, index or
config. A real header holds a few thousand tensors at ~8 items each; 100 MB of tiny hostile entries
would become millions of Python objects (GBs) if parsed."""

CONFIG_CAP = 16 * 1024 * 1024
"""config.json files are kilobytes; anything this large is not one."""


def parse_json(raw: bytes, where: str, what: str) -> object:
    """json.loads for untrusted bytes: bounded in the objects it may create, every failure one SwtoolError."""
    if raw.count(b",") + raw.count(b"{") + raw.count(b"[") > JSON_ITEMS_CAP:
        raise SwtoolError(f"{where}: {what} holds more than {JSON_ITEMS_CAP} JSON values; refusing it (real ones hold thousands)")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SwtoolError(f"{where}: {what} is not valid JSON ({exc.__class__.__name__})") from None


def read_json(path: Path, cap: int, what: str) -> object:
    size = path.stat().st_size
    if size > cap:
        raise SwtoolError(f"{path}: {size} bytes is too large for {what} (at most {cap})")
    return parse_json(path.read_bytes(), str(path), what)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset in the file."""
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its entries and `__metadata__`."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise SwtoolError(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > HEADER_CAP:
            raise SwtoolError(f"{path}: safetensors header of {header_len} bytes exceeds the format's 100 MB cap")
        if 8 + header_len > size:
            raise SwtoolError(f"{path}: safetensors header length ({header_len}) runs past the end of the file (truncated?)")
        raw = fh.read(header_len)
    header = parse_json(raw, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise SwtoolError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SwtoolError(f"{path}: safetensors __metadata__ is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SwtoolError(f"{path}: tensor {name}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in STORAGE:
            raise SwtoolError(f"{path}: tensor {name}: unknown dtype {dtype!r} (known: {', '.join(STORAGE)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise SwtoolError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise SwtoolError(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise SwtoolError(
                f"{path}: tensor {name}: data_offsets end at byte {end} but the file holds {data_size} data bytes (truncated?)"
            )
        expected = math.prod(shape) * STORAGE[dtype].size
        if end - begin != expected:
            raise SwtoolError(
                f"{path}: tensor {name}: shape {shape} of {dtype} needs {expected} bytes, data_offsets give {end - begin}"
            )
        entries[name] = TensorEntry(path, dtype, tuple(shape), data_start + begin, end - begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise SwtoolError(f"{path}: tensor {name} overlaps the previous tensor's bytes")
        if begin > position:
            raise SwtoolError(f"{path}: a hole of {begin - position} bytes precedes tensor {name}")
        position = end
    if position != data_size:
        raise SwtoolError(f"{path}: {data_size - position} trailing bytes after the last tensor")
    return entries, {str(k): str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class Shards:
    """A directory's tensors, parsed once: every entry, and the first file's `__metadata__`
    (where swtool-rtn and compressed-tensors record what they are)."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_shards(directory: Path) -> Shards:
    """Every tensor of a directory, its index checked against the shards it names."""
    metadata: dict[str, dict[str, str]] = {}
    entries = _shard_map(directory, metadata)
    return Shards(entries, metadata[min(metadata)] if metadata else {})


def _shard_map(directory: Path, metadata: dict[str, dict[str, str]]) -> dict[str, TensorEntry]:
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    pickles = sorted(p for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if index_path.exists():
        index = read_json(index_path, HEADER_CAP, "a safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SwtoolError(f"{index_path}: not a valid index (needs a JSON object with a weight_map of shard names)")
        shard_names = sorted(set(weight_map.values()))
        for shard_name in shard_names:
            if shard_name != Path(shard_name).name or shard_name.startswith("."):
                raise SwtoolError(f"{index_path}: shard name {shard_name!r} is not a file name in the model directory")
        entries: dict[str, TensorEntry] = {}
        for shard_name in shard_names:
            shard = directory / str(shard_name)
            if not shard.is_file():
                raise SwtoolError(f"{index_path}: names shard {shard_name}, which does not exist")
            shard_entries, metadata[shard.name] = read_header(shard)
            for name, entry in shard_entries.items():
                if name in entries:
                    raise SwtoolError(f"{directory}: tensor {name} is stored in two shards ({entries[name].file.name}, {shard.name})")
                entries[name] = entry
        for name, shard_name in weight_map.items():
            if name not in entries:
                raise SwtoolError(f"{index_path}: tensor {name} is listed in {shard_name} but not stored there")
            if entries[name].file.name != shard_name:
                raise SwtoolError(f"{index_path}: tensor {name} is listed in {shard_name} but stored in {entries[name].file.name}")
        unindexed = [p.name for p in directory.glob("*.safetensors") if SHARD_PATTERN.match(p.name) and p.name not in shard_names]
        if unindexed:
            raise SwtoolError(f"{directory}: shard {sorted(unindexed)[0]} is not in model.safetensors.index.json")
        return entries
    if single.is_file():
        entries, metadata[single.name] = read_header(single)
        return entries
    if pickles:
        raise pickle_refusal(pickles[0])
    raise SwtoolError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no config.json (not a Hugging Face model directory)")
    config = read_json(path, CONFIG_CAP, "config.json")
    if not isinstance(config, dict):
        raise SwtoolError(f"{path}: not a JSON object")
    return config




LAYER = re.compile(r"(?:\.layers\.|^blk\.)(\d+)\.")


def layer_spans(shards: Shards) -> list[tuple[Path, int, int]]:
    """(file, start, stop) byte ranges in the order a layer walk reads them: each layer's tensors, then the rest.

    Shards store names sorted as text (layer 10 before layer 2), so ranges are ordered by layer
    number, and adjacent ones merged. The embedding matrix is left out where a separate LM head
    exists (a walk reads only the prompt's rows of it; 6 % of a 1.1B model).
    """
    tensors = [(name, e) for name, e in shards.entries.items()]
    if "lm_head.weight" in shards.entries:
        tensors = [(name, e) for name, e in tensors if not name.endswith("embed_tokens.weight")]

    def order(item: tuple[str, TensorEntry]) -> tuple[int, str, int]:
        layer = LAYER.search(item[0])
        return (int(layer.group(1)) if layer else 1 << 30, str(item[1].file), item[1].start)

    spans: list[tuple[Path, int, int]] = []
    for _, entry in sorted(tensors, key=order):
        begin, end = entry.start, entry.start + entry.nbytes
        if spans and spans[-1][0] == entry.file and spans[-1][2] == begin:
            spans[-1] = (entry.file, spans[-1][1], end)
        else:
            spans.append((entry.file, begin, end))
    return spans
