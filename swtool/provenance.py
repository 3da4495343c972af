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

The inputs are hashed on a background thread (swtool.digests) while the
command reads and writes, and the writers record a stand-in of the same length
for each digest: 64 random hex digits, which appear verbatim in every encoding
the writers use (a JSON string, a JSON string inside JSON, a GGUF string).
`Provenance.seal` then overwrites each stand-in in place with the real digest
before the output is moved into place; no length, offset or other byte of the
output changes.
"""

from __future__ import annotations

import json
import mmap
import secrets
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from swtool import __version__, digests
from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint
from swtool.formats.hf.export import MODEL_FILES
from swtool.formats.pickles import PICKLE_SUFFIXES


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


def record(command: str, options: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, str]:
    """The four `swtool.*` metadata fields for an output of `command`.

    `options`: the options that determine the output's bytes (bits, block, super weights
    used...), not where it goes or how chatty the run is (-o, --force, --quiet).
    `hashes`: recorded input name -> sha256 (hex).
    """
    return {
        "swtool.version": __version__,
        "swtool.command": command,
        "swtool.options": json.dumps(_plain(options), sort_keys=True, separators=(",", ":")),
        "swtool.inputs": json.dumps(dict(hashes), sort_keys=True, separators=(",", ":")),
    }


class Provenance:
    """The provenance fields of one output, its inputs hashed meanwhile (see the module's docstring).

    `inputs`: every file or directory the output is made from (MODEL, a --super FILE);
    `known`: name -> sha256 of inputs that are no file, or were already hashed (`--super -`).
    Use it as a context manager: leaving it without `seal` (a failed command) stops the hashing.
    """

    def __init__(self, command: str, options: Mapping[str, Any], inputs: Iterable[str | Path], known: Mapping[str, str] | None = None):
        files = {name: file for item in inputs for name, file in input_files(Path(item)).items()}
        self._stand_ins = {name: secrets.token_hex(32) for name in files}
        self.fields = record(command, options, {**(known or {}), **self._stand_ins})
        """What the writers store; each digest of an input file is a stand-in until `seal`."""
        self._known = dict(known or {})
        futures = digests.sha256_later(files.values())
        self._futures = {name: futures[file] for name, file in files.items()}
        self._sealed = False

    def digests(self) -> dict[str, str]:
        """Every recorded input's sha256, once hashed."""
        out = dict(self._known)
        for name, future in self._futures.items():
            try:
                out[name] = future.result()
            except CancelledError:
                raise digests.Cancelled(name) from None
            except OSError as exc:
                raise SwtoolError(f"cannot read an input to record its sha256: {exc.strerror}: {exc.filename}") from None
        return out

    def seal(self, output: Path) -> None:
        """Overwrite every stand-in in the written `output` (a file or a directory) with its input's digest."""
        hashes = self.digests()
        replacements = {stand_in.encode(): hashes[name].encode() for name, stand_in in self._stand_ins.items()}
        files = sorted(p for p in output.rglob("*") if p.is_file()) if output.is_dir() else [output]
        found: set[bytes] = set()
        for file in files:
            found |= _replace_first(file, replacements)
        if replacements and not found:
            raise SwtoolError(f"internal: {output} records no provenance to seal")
        self._sealed = True

    def __enter__(self) -> Provenance:
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self._sealed:
            digests.stop()


def _metadata_end(file: Path, mapped: mmap.mmap) -> int:
    """Where a stand-in may lie: a safetensors file's JSON header, any other file whole."""
    if file.suffix == ".safetensors" and len(mapped) >= 8:
        return min(len(mapped), 8 + struct.unpack_from("<Q", mapped, 0)[0])
    return len(mapped)


def _replace_first(file: Path, replacements: Mapping[bytes, bytes]) -> set[bytes]:
    """Each writer stores the fields once per file, so the first occurrence of a stand-in is the one:
    a GGUF file's lies in its key/values, long before the tensor data, which is never searched."""
    found: set[bytes] = set()
    with file.open("r+b") as fh:
        if fh.seek(0, 2) == 0:
            return found
        with mmap.mmap(fh.fileno(), 0) as mapped:
            end = _metadata_end(file, mapped)
            for stand_in, digest in replacements.items():
                at = mapped.find(stand_in, 0, end)
                if at >= 0:
                    mapped[at : at + len(digest)] = digest
                    found.add(stand_in)
    return found


def model_inputs(checkpoint: Checkpoint) -> list[Path]:
    """Every file of the model a command reads: weights, config and tokenizer files."""
    files = list(checkpoint.files)
    if checkpoint.path.is_dir():
        files += [checkpoint.path / f for f in MODEL_FILES if (checkpoint.path / f).is_file()]
        index = checkpoint.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
    return sorted(set(files))
