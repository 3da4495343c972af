"""Bit packing of integer codes into bytes, dense and little-endian, for 2, 3, 4 and 8 bits.

Codes are packed in groups: the smallest number of codes whose bits fill whole
bytes (4 codes of 2 bits -> 1 byte, 2 of 4 bits -> 1 byte, 8 of 3 bits -> 3
bytes, 1 of 8 bits -> 1 byte). Inside a group, code j occupies bits
[j*bits, (j+1)*bits) of the group read as a little-endian integer; so with 4
bits the first code is the low nibble. The last group is padded with zero codes.

One vectorised path serves every width: a group of one-byte codes is viewed as
one wide integer (int16, int32, int64), and each code is moved from bit 8j to
bit j*bits by one shift and one mask; unpacking does the reverse. Working on
whole words avoids strided byte access, the slow part of a naive version.
Little-endian byte order of the host is assumed (x86 and ARM are).
"""

from __future__ import annotations

import math

import torch

from swtool import native
from swtool.errors import SwtoolError
from swtool.workers import run_chunks

WIDTHS = (2, 3, 4, 8)
WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Wide integer type viewing one group of `codes` one-byte codes."""
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


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits) into a flat uint8 tensor of packed_size bytes."""
    per_group, nbytes = group(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    pad = -flat.numel() % per_group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(WORDS[per_group])
    out = torch.empty(words.numel(), nbytes, dtype=torch.uint8)
    mask = (1 << bits) - 1
    lib = native.kernels()
    if lib is not None:  # the same bytes in one pass (swtool/kernels/core.c), fast enough not to need threads
        lib.pack_codes(words.data_ptr(), words.numel(), bits, out.data_ptr())
        return out.view(-1)

    def work(start: int) -> None:
        word = words[start : start + CHUNK_GROUPS]
        packed = word & mask
        for j in range(1, per_group):
            packed |= (word >> (j * (8 - bits))) & (mask << (j * bits))
        if nbytes == 1:
            out[start : start + CHUNK_GROUPS, 0] = packed
        else:
            out[start : start + CHUNK_GROUPS] = packed.view(torch.uint8).view(-1, per_group)[:, :nbytes]

    run_chunks(work, range(0, words.numel(), CHUNK_GROUPS))
    return out.view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of a packed byte tensor, as a flat uint8 tensor."""
    per_group, nbytes = group(bits)
    if packed.numel() != packed_size(count, bits):
        raise SwtoolError(f"packed codes hold {packed.numel()} bytes; {count} codes of {bits} bits need {packed_size(count, bits)}")
    if bits == 8:
        return packed.reshape(-1)
    rows = packed.reshape(-1, nbytes)
    wide = WORDS[per_group]
    out = torch.empty(rows.shape[0], dtype=wide)
    mask = (1 << bits) - 1

    def work(start: int) -> None:
        chunk = rows[start : start + CHUNK_GROUPS]
        if nbytes == 1:
            word = chunk[:, 0].to(wide)
        else:
            padded = torch.zeros(chunk.shape[0], per_group, dtype=torch.uint8)
            padded[:, :nbytes] = chunk
            word = padded.view(wide).view(-1)
        codes = word & mask
        for j in range(1, per_group):
            codes |= (word << (j * (8 - bits))) & (mask << (8 * j))
        out[start : start + CHUNK_GROUPS] = codes

    run_chunks(work, range(0, rows.shape[0], CHUNK_GROUPS))
    return out.view(torch.uint8)[:count]
