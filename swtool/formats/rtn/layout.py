"""The on-disk layout of a swtool-quantized safetensors checkpoint, shared by its writer and reader.

Each quantized tensor NAME is stored as four tensors:
  NAME.qcodes  U8   [packed bytes]   codes packed as in swtool.codecs.pack
  NAME.qscale  F16  [blocks]         one scale per block
  NAME.qzero   F16  [blocks]         one zero point per block
  NAME.qshape  I64  [ndim]           the original shape, e.g. [576, 1536]
and is rebuilt as  W.flatten()[i] = code[i] * scale[i // B] + zero[i // B],
then each held-out super weight is written back. Every other tensor is stored
as itself. The safetensors `__metadata__` carries (all values are strings; the
`swtool.*` ones hold JSON):
  swtool.format          "swtool-rtn"
  swtool.format_version  "1"
  swtool.quant           {"bits", "block" (int | "channel" | "tensor"), "sym", "clip", "dtype"}
  swtool.super           [{"tensor", "row", "col", "value"}]   the side table, values exact fp16
  swtool.source          the MODEL path as given on the command line, resolved
  swtool.version, swtool.command, swtool.options, swtool.inputs   see swtool.provenance
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from swtool.codecs.pack import packed_size
from swtool.codecs.rtn import QuantizedTensor, block_length, check_bits, parse_block
from swtool.errors import SwtoolError
from swtool.formats.base import FLOATS, STORAGE, HeldValues, held_table
from swtool.formats.hf.writer import PlannedTensor

FORMAT = "swtool-rtn"
VERSION = 1
SUFFIXES = (".qcodes", ".qscale", ".qzero", ".qshape")
CODES, SCALE, ZERO, SHAPE = SUFFIXES
DTYPE_NAMES = {str(STORAGE[name].torch).removeprefix("torch."): STORAGE[name].torch for name in FLOATS}
"""The source dtypes recorded in swtool.quant, by torch's name."""


def planned(name: str, shape: tuple[int, ...], bits: int, block: int | str) -> list[PlannedTensor]:
    """The four stored tensors of one quantized weight, in write order."""
    count = math.prod(shape)
    blocks = -(-count // block_length(block, shape))
    return [
        PlannedTensor(name + CODES, "U8", (packed_size(count, bits),)),
        PlannedTensor(name + SCALE, "F16", (blocks,)),
        PlannedTensor(name + ZERO, "F16", (blocks,)),
        PlannedTensor(name + SHAPE, "I64", (len(shape),)),
    ]


def stored(name: str, q: QuantizedTensor) -> list[tuple[str, torch.Tensor]]:
    return [
        (name + CODES, q.codes),
        (name + SCALE, q.scale),
        (name + ZERO, q.zero),
        (name + SHAPE, torch.tensor(q.shape, dtype=torch.int64)),
    ]


@dataclass(frozen=True)
class Header:
    """What the reader needs from `__metadata__`."""

    bits: int
    block: int | str
    sym: bool
    clip: str
    dtype: torch.dtype
    """Default dtype of dequantized tensors (the source's)."""
    held: HeldValues
    """Canonical tensor name -> (row, col, fp16 value) of its held-out weights."""


def metadata(bits: int, block: int | str, sym: bool, clip: str, dtype: torch.dtype, held: HeldValues, provenance: dict[str, str]) -> dict[str, str]:
    meta = {
        "swtool.format": FORMAT,
        "swtool.format_version": str(VERSION),
        "swtool.quant": json.dumps({"bits": bits, "block": block, "sym": sym, "clip": clip, "dtype": str(dtype).removeprefix("torch.")}),
        "swtool.super": held_table(held),
    }
    meta.update(provenance)  # swtool.version, .command, .options, .inputs (swtool.provenance), and swtool.source
    return meta


def is_quantized(meta: dict[str, str]) -> bool:
    return meta.get("swtool.format") == FORMAT


def parse_header(meta: dict[str, str], where: str) -> Header:
    if not is_quantized(meta):
        raise SwtoolError(f"{where}: not a swtool-quantized checkpoint (no swtool.format in its safetensors metadata)")
    if meta.get("swtool.format_version") != str(VERSION):
        raise SwtoolError(f"{where}: swtool format version {meta.get('swtool.format_version')!r}; this swtool reads version {VERSION}")
    try:
        quant = json.loads(meta["swtool.quant"])
        table = json.loads(meta.get("swtool.super", "[]"))
        bits = check_bits(int(quant["bits"]))
        block = parse_block(str(quant["block"]))
        dtype = DTYPE_NAMES[quant.get("dtype", "float16")]
        held: HeldValues = {}
        for entry in table:
            held.setdefault(str(entry["tensor"]), []).append((int(entry["row"]), int(entry["col"]), float(entry["value"])))
        return Header(bits, block, bool(quant["sym"]), str(quant.get("clip", "none")), dtype, held)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SwtoolError(f"{where}: damaged swtool metadata ({exc.__class__.__name__}: {exc})") from None
