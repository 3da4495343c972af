"""Which weights are the super weights: from a scan run here, or from `swtool scan --json` output, checked against the model.

Scan output names tensors as stored in the scanned file (HF names, or GGUF
names such as `blk.11.ffn_down.weight`); both spellings are accepted and mapped
to the checkpoint's canonical names. A document that does not fit the model
(unknown tensor, coordinates outside the weight) is refused, since holding out
the wrong scalar would silently protect nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TextIO

from swtool.detect import ScanResult, scan
from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint, Held


def parse_scan_json(text: str, where: str) -> list[dict]:
    """The super_weights of one `swtool scan --json` document (JSON Lines holding one model accepted)."""
    stripped = text.strip()
    if not stripped:
        raise SwtoolError(f"{where}: empty; expected `swtool scan --json` output")
    try:
        documents = [json.loads(stripped)]
    except json.JSONDecodeError:
        try:
            documents = [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise SwtoolError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if len(documents) != 1:
        raise SwtoolError(f"{where}: holds scans of {len(documents)} models; give the one for this model")
    document = documents[0]
    if not isinstance(document, dict) or not isinstance(document.get("super_weights"), list):
        raise SwtoolError(f"{where}: no super_weights list; expected `swtool scan --json` output")
    return document["super_weights"]


def read_argument(argument: str, checkpoint: Checkpoint, stdin: TextIO) -> tuple[list[Held], str, str]:
    """`--super FILE` or `--super -`: the held weights, the input's label and its sha256 (for provenance)."""
    if argument == "-":
        text, label = stdin.read(), "<stdin>"
    else:
        path = Path(argument)
        if not path.is_file():
            raise SwtoolError(f"--super {argument}: no such file")
        try:
            text, label = path.read_text(), str(path.resolve())
        except UnicodeDecodeError:
            raise SwtoolError(f"--super {argument}: not a text file") from None
    where = f"--super {argument}"
    return resolve(parse_scan_json(text, where), checkpoint, where), label, hashlib.sha256(text.encode()).hexdigest()


def resolve(entries: list[dict], checkpoint: Checkpoint, where: str) -> list[Held]:
    """Check each entry against the checkpoint and name it canonically."""
    by_stored = {checkpoint.stored_name(n): n for n in checkpoint.names()}
    held: list[Held] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SwtoolError(f"{where}: super_weights[{index}] is not an object")
        tensor, row, col = entry.get("tensor"), entry.get("row"), entry.get("col")
        if not isinstance(tensor, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (row, col)):
            raise SwtoolError(f"{where}: super_weights[{index}] needs a string tensor and integer row and col")
        name = by_stored.get(tensor, tensor if checkpoint.has(tensor) else None)
        if entry.get("expert") is not None and isinstance(entry.get("layer"), int):
            # Routed experts may share one stored tensor (GGUF's merged ffn_down_exps): name the expert's own slice.
            config = checkpoint.config
            expert_name = checkpoint.family.down_tensor(config, entry["layer"], int(entry["expert"]))
            name = expert_name if checkpoint.has(expert_name) and tensor in (expert_name, checkpoint.stored_name(expert_name)) else None
        if name is None:
            raise SwtoolError(f"{where}: tensor {tensor} is not in {checkpoint.path} (a scan of another model?)")
        shape = checkpoint.shape(name)
        if len(shape) != 2 or not (0 <= row < shape[0] and 0 <= col < shape[1]):
            raise SwtoolError(f"{where}: {tensor}[{row}, {col}] is outside the tensor's shape {list(shape)} (a scan of another model?)")
        held.append(Held(name, row, col))
    return sorted(set(held), key=lambda h: (h.tensor, h.row, h.col))


def from_scan(result: ScanResult, checkpoint: Checkpoint) -> list[Held]:
    return resolve(result.to_json()["super_weights"], checkpoint, "scan")


def find_super_weights(checkpoint: Checkpoint, super_file: str | None, stdin: TextIO, *, required: bool, **scan_options) -> list[Held]:
    """The super weights named by `--super FILE|-`, or found by a scan; none found is an error when `required`."""
    if super_file is not None:
        held = read_argument(super_file, checkpoint, stdin)[0]
    else:
        held = from_scan(scan(checkpoint, **scan_options), checkpoint)
    if required and not held:
        source = f"--super {super_file} lists" if super_file is not None else "the scan found"
        raise SwtoolError(f"{source} no super weight in {checkpoint.path}; nothing to act on")
    return held
