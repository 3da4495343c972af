"""How an output was made, recorded in its own metadata.

Every writer (safetensors `__metadata__`, GGUF key/values, the index of a
sharded directory) stores the same four string fields, so a user can tell
later which swtool, which options and which exact input files produced a
checkpoint:

    swtool.version   "0.1.0"
    swtool.command   "quantize"
    swtool.options   JSON object, keys sorted: the options that shape the output
    swtool.inputs    JSON object, keys sorted: input file name -> sha256 (hex)

Nothing in it depends on the time, the machine or where the output goes, so
the same input and options still give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swtool import __version__
from swtool.formats.base import Checkpoint
from swtool.formats.hf.export import MODEL_FILES
from swtool.formats.pickles import PICKLE_SUFFIXES

CHUNK = 1 << 20
"""Bytes hashed at a time: memory stays flat however large the input."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def input_files(path: Path) -> dict[str, Path]:
    """Recorded name -> file. A file is named by its base name; a directory stands for the files
    swtool may read or copy from it (not hidden ones, not pickles), named DIR/relative/path."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: path}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in PICKLE_SUFFIXES)
    return {
        f"{path.name}/{p.relative_to(path).as_posix()}": p
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    }


def _plain(value: Any) -> Any:
    """Options as JSON: paths and other objects as strings, containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def provenance(command: str, options: Mapping[str, Any], inputs: Iterable[str | Path], digests: Mapping[str, str] | None = None) -> dict[str, str]:
    """The four `swtool.*` metadata fields for an output of `command`.

    `options`: the options that determine the output's bytes (bits, block, super weights
    used...), not where it goes or how chatty the run is (-o, --force, --quiet).
    `inputs`: every file or directory the output was made from (MODEL, a --super FILE).
    `digests`: name -> sha256 of inputs that are no file, or were already hashed (`--super -`).
    """
    hashes: dict[str, str] = dict(digests or {})
    for item in inputs:
        for name, file in input_files(Path(item)).items():
            hashes[name] = sha256_file(file)
    return {
        "swtool.version": __version__,
        "swtool.command": command,
        "swtool.options": json.dumps(_plain(options), sort_keys=True, separators=(",", ":")),
        "swtool.inputs": json.dumps(hashes, sort_keys=True, separators=(",", ":")),
    }


def model_inputs(checkpoint: Checkpoint) -> list[Path]:
    """Every file of the model a command reads: weights, config and tokenizer files."""
    files = list(checkpoint.files)
    if checkpoint.path.is_dir():
        files += [checkpoint.path / f for f in MODEL_FILES if (checkpoint.path / f).is_file()]
        index = checkpoint.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
    return sorted(set(files))
