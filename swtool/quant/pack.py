"""Bit packing of integer codes into bytes, dense and little-endian, for 2, 3, 4 and 8 bits.

Codes are packed in groups: the smallest number of codes whose bits fill whole
bytes (4 codes of 2 bits -> 1 byte, 2 of 4 bits -> 1 byte, 8 of 3 bits -> 3
bytes, 1 of 8 bits -> 1 byte). Inside a group, code j occupies bits
[j*bits, (j+1)*bits) of the group read as a little-endian integer; so with 4
bits the first code is the low nibble. The last group is padded with zero codes.
One vectorised path serves every width, so there is one layout to document;
it runs in chunks so that widening to int32 (3 bits) never copies a whole tensor.
"""

from __future__ import annotations

import math

import torch

from swtool.errors import SwtoolError

WIDTHS = (2, 3, 4, 8)
CHUNK_GROUPS = 1 << 18


def group(bits: int) -> tuple[int, int]:
    """(codes, bytes) per packing group for `bits`-bit codes."""
    if bits not in WIDTHS:
        raise SwtoolError(f"--bits {bits}: supported widths are {', '.join(map(str, WIDTHS))}")
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits."""
    codes, nbytes = group(bits)
    return -(-count // codes) * nbytes


def _word_dtype(nbytes: int) -> torch.dtype:
    """Groups of one byte are assembled in uint8 (no widening); wider groups in int32."""
    return torch.uint8 if nbytes == 1 else torch.int32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits) into a flat uint8 tensor of packed_size bytes."""
    per_group, nbytes = group(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    pad = -flat.numel() % per_group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_group)
    out = torch.empty(groups.shape[0], nbytes, dtype=torch.uint8)
    for start in range(0, groups.shape[0], CHUNK_GROUPS):
        chunk = groups[start : start + CHUNK_GROUPS].to(_word_dtype(nbytes))
        word = chunk[:, 0].clone()
        for j in range(1, per_group):
            word |= chunk[:, j] << (bits * j)
        for k in range(nbytes):
            out[start : start + CHUNK_GROUPS, k] = (word >> (8 * k)) & 0xFF
    return out.view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of a packed byte tensor, as a flat uint8 tensor."""
    per_group, nbytes = group(bits)
    if packed.numel() != packed_size(count, bits):
        raise SwtoolError(f"packed codes hold {packed.numel()} bytes; {count} codes of {bits} bits need {packed_size(count, bits)}")
    if bits == 8:
        return packed.reshape(-1)
    rows = packed.reshape(-1, nbytes)
    mask = (1 << bits) - 1
    out = torch.empty(rows.shape[0], per_group, dtype=torch.uint8)
    for start in range(0, rows.shape[0], CHUNK_GROUPS):
        chunk = rows[start : start + CHUNK_GROUPS].to(_word_dtype(nbytes))
        word = chunk[:, 0].clone()
        for k in range(1, nbytes):
            word |= chunk[:, k] << (8 * k)
        for j in range(per_group):
            out[start : start + CHUNK_GROUPS, j] = (word >> (bits * j)) & mask
    return out.view(-1)[:count]
