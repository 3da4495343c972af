"""The super weight directory: published coordinates as data, users' own entries, and checks against a scan.

The packaged directory (`swtool/data/directory.json`) holds the paper's table
and the entries the authors' code adds. A user's local directory is a JSON
Lines file whose lines are either entries (`{"model", "layer", "row", "col",
...}`) or whole `swtool scan --json` documents, so scan results can simply be
appended to it (`swtool scan M --json >> mine.jsonl`); every super weight of
such a document becomes an entry.

Models are matched by name after lower-casing and dropping everything but
letters and digits, against the entry's model name and its aliases (Hugging
Face repository names); a repository name's owner part is ignored, so
`meta-llama/Llama-2-7b-hf`, a local `.../Llama-2-7b-hf` directory and a GGUF
`general.name` of `Llama 2 7b Hf` all match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from swtool.errors import SwtoolError

FOUND, ELSEWHERE, NOT_FOUND = "found", "found elsewhere", "not found"


@dataclass(frozen=True)
class Entry:
    model: str
    layer: int
    row: int
    col: int
    tensor: str
    source: str
    expert: int | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out


@dataclass
class Directory:
    entries: list[Entry]
    sources: dict[str, str] = field(default_factory=dict)
    """Source label -> what it refers to."""

    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model for e in self.entries))

    def for_model(self, name: str) -> list[Entry]:
        key = normalise(name)
        return [e for e in self.entries if key in {normalise(n) for n in (e.model, *e.aliases)}]

    def require(self, name: str) -> list[Entry]:
        """The entries of `name`, which the user asked for explicitly (--expect)."""
        entries = self.for_model(name)
        if not entries:
            raise SwtoolError(f"--expect {name}: not in the super weight directory (known: {', '.join(self.models())})")
        return entries

    def identify(self, names: list[str]) -> str | None:
        """The directory model that one of `names` (config name, GGUF general.name, path) names, if any."""
        for name in names:
            if name and (entries := self.for_model(name)):
                return entries[0].model
        return None


def normalise(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", base.lower())


def packaged() -> Directory:
    doc = json.loads(resources.files("swtool").joinpath("data/directory.json").read_text(encoding="utf-8"))
    return Directory([_entry(e, "swtool/data/directory.json") for e in doc["entries"]], dict(doc.get("sources", {})))


def load(files: Sequence[Path] = ()) -> Directory:
    """The packaged directory followed by the entries of each local file."""
    directory = packaged()
    for path in files:
        directory.entries.extend(read_file(path))
    return directory


def read_file(path: Path) -> list[Entry]:
    """Entries of a local directory file: JSON Lines of entries and/or `swtool scan --json` documents."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SwtoolError(f"{path}: cannot read directory file ({exc.__class__.__name__})") from None
    entries: list[Entry] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SwtoolError(f"{where}: not a JSON line ({exc.msg})") from None
        if isinstance(doc, dict) and "super_weights" in doc:
            entries.extend(from_scan(doc, where))
        else:
            entries.append(_entry(doc, where))
    return entries


def from_scan(doc: dict[str, Any], where: str = "scan") -> list[Entry]:
    """Directory entries for the super weights of one `swtool scan --json` document."""
    name = doc.get("name") or Path(str(doc.get("model", ""))).stem
    if not name:
        raise SwtoolError(f"{where}: scan document names no model")
    source = f"swtool scan of {doc.get('model', name)}"
    weights = doc.get("super_weights")
    if not isinstance(weights, list):
        raise SwtoolError(f"{where}: super_weights is not a list")
    return [_entry({**w, "model": name, "source": source}, where) for w in weights]


def _entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise SwtoolError(f"{where}: a directory entry must be a JSON object")
    try:
        layer, row, col = (int(raw[k]) for k in ("layer", "row", "col"))
        model = str(raw["model"])
    except (KeyError, TypeError, ValueError):
        raise SwtoolError(f"{where}: a directory entry needs model, layer, row and col (integers)") from None
    if min(layer, row, col) < 0:
        raise SwtoolError(f"{where}: layer, row and col must be non-negative")
    expert = raw.get("expert")
    return Entry(
        model=model,
        layer=layer,
        row=row,
        col=col,
        tensor=str(raw.get("tensor") or f"model.layers.{layer}.mlp.down_proj.weight"),
        source=str(raw.get("source") or "local"),
        expert=int(expert) if expert is not None else None,
        aliases=tuple(str(a) for a in raw.get("aliases") or ()),
        note=str(raw.get("note") or ""),
    )


def compare(entries: list[Entry], super_weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per directory entry: found (a super weight at its layer, row, col and expert), found elsewhere
    (none there, but a super weight that no entry lists sits on the same row or column: the same
    super activation channel or the same input channel, e.g. one layer off), or not found."""

    def place(x: Any) -> tuple:
        return (x["layer"], x["row"], x["col"], x.get("expert")) if isinstance(x, dict) else (x.layer, x.row, x.col, x.expert)

    listed = {place(e) for e in entries}
    unlisted = [w for w in super_weights if place(w) not in listed]
    report = []
    for e in entries:
        here = [w for w in super_weights if place(w) == place(e)]
        near = [w for w in unlisted if w["row"] == e.row or w["col"] == e.col]
        status = FOUND if here else ELSEWHERE if near else NOT_FOUND
        report.append(
            {
                "model": e.model,
                "layer": e.layer,
                "row": e.row,
                "col": e.col,
                "expert": e.expert,
                "source": e.source,
                "status": status,
                "found_at": [{k: w.get(k) for k in ("layer", "row", "col", "expert", "tensor")} for w in (here or near)],
            }
        )
    return report


def expected(directory: Directory, super_weights: list[dict[str, Any]], names: list[str], expect: str | None = None) -> list[dict[str, Any]] | None:
    """The comparison with the directory entries of `expect`, or of the model `names` identify; None when neither applies."""
    if expect is not None:
        entries = directory.require(expect)
    else:
        model = directory.identify(names)
        if model is None:
            return None
        entries = directory.for_model(model)
    return compare(entries, super_weights)
