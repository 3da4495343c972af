"""swtool.codecs.compressed: integer RTN with integer zero points, dense int32 packing, FP8 per channel.

The packing is checked twice: from first principles (element i of a row at bits [i*b, (i+1)*b) of a
little-endian stream, which does not need the package) and against compressed-tensors' own
pack_to_int32 (the pinned 0.20.1, including the 3-bit order, whose codes straddle int32 words).
"""

from __future__ import annotations

import math

import pytest
import torch

from swtool.codecs.compressed import (
    FP8,
    code_range,
    dequantize_int,
    dequantize_values,
    pack_int32,
    pack_zero,
    quantize_fp8,
    quantize_int,
    unpack_int32,
    unpack_zero,
)
from swtool.codecs.rtn import Clip
from swtool.errors import SwtoolError

WIDTHS = (2, 3, 4, 8)


def stream_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The packing as the format defines it, one Python integer per row: code i at bit i * bits."""
    rows, cols = codes.shape
    words = math.ceil(cols * bits / 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    for r in range(rows):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r].tolist()))
        for w in range(words):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[r, w] = word - (1 << 32) if word >= 1 << 31 else word
    return out


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("cols", [32, 33, 40, 96, 100])
def test_packing_is_a_little_endian_bit_stream_per_row(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(bits * cols), dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, stream_words(codes, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("cols", [32, 40, 100])
def test_packing_matches_the_pinned_package(bits, cols):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    low, high = code_range(bits)
    signed = torch.randint(low, high + 1, (6, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    unsigned = (signed.to(torch.int16) - low).to(torch.uint8)
    assert torch.equal(pack_int32(unsigned, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(unpack_int32(helpers.pack_to_int32(signed, bits), bits, cols), unsigned)
    zero = torch.randint(low, high + 1, (cols, 3), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(pack_zero(zero, bits), helpers.pack_to_int32(zero, bits, packed_dim=0))
    assert torch.equal(unpack_zero(pack_zero(zero, bits), bits, cols), zero)


def test_unpack_refuses_a_wrong_word_count():
    with pytest.raises(SwtoolError, match="int32 words"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


def weight(rows: int = 24, cols: int = 128, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, 17] = 0.9  # an outlier that sets its group's range
    return w


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_error_within_half_a_step_and_zero_in_the_grid(bits, sym, group):
    w = weight()
    before = w.clone()
    q = quantize_int(w, bits, group, sym, torch.float32)
    assert torch.equal(w, before), "the caller's tensor must stay untouched"
    low, high = code_range(bits)
    assert int(q.codes.max()) <= high - low
    rebuilt = dequantize_int(q.codes, q.scale, q.zero, bits)
    step = q.scale.float().repeat_interleave(group, dim=1)
    assert bool(((rebuilt - w).abs() <= step / 2 * (1 + 1e-5)).all())
    if sym:
        assert q.zero is None
    else:  # the integer zero point lies in the code range, so 0 decodes exactly
        assert q.zero.dtype == torch.int8 and int(q.zero.min()) >= low and int(q.zero.max()) <= high


def test_asymmetric_uses_the_range_better_than_symmetric():
    w = weight().abs()  # one-sided groups: symmetric wastes half its codes
    asym = dequantize_int(*(lambda q: (q.codes, q.scale, q.zero))(quantize_int(w, 4, 32, False, torch.float32)), 4)
    sym = dequantize_int(*(lambda q: (q.codes, q.scale, q.zero))(quantize_int(w, 4, 32, True, torch.float32)), 4)
    assert float((asym - w).pow(2).sum()) < 0.5 * float((sym - w).pow(2).sum())


def test_zero_groups_decode_to_exact_zeros():
    w = weight()
    w[5] = 0
    for sym in (False, True):
        q = quantize_int(w, 4, 32, sym, torch.float16)
        assert torch.equal(dequantize_int(q.codes, q.scale, q.zero, 4)[5], torch.zeros(128, dtype=torch.float16))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, sym, group", [(4, False, 32), (4, True, 128), (3, False, 64), (8, False, 128), (2, True, 32)])
def test_codes_and_weights_match_the_package(scale_dtype, bits, sym, group):
    """Given swtool's scales and zero points, the package's quantize picks the same codes and its dequantize
    (in the scale's dtype) the same weights, bit for bit."""
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    w = weight().to(scale_dtype)
    q = quantize_int(w, bits, group, sym, scale_dtype)
    strategy = "channel" if group == w.shape[1] else "group"
    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=group if strategy == "group" else None)
    signed = (q.codes.to(torch.int16) + code_range(bits)[0]).to(torch.int8)
    zero = q.zero.float() if q.zero is not None else None
    assert torch.equal(forward.quantize(w.float(), q.scale.float(), zero, args, dtype=torch.int8), signed)
    rebuilt = dequantize_int(q.codes, q.scale, q.zero, bits)
    reference = forward.dequantize(signed, q.scale, q.zero, args)
    assert rebuilt.dtype == reference.dtype == scale_dtype and torch.equal(rebuilt, reference)


def test_clipping_changes_only_the_values_rounded():
    w = weight()
    plain = quantize_int(w, 4, 32, False, torch.float32)
    clipped = quantize_int(w, 4, 32, False, torch.float32, Clip("z", 2.0))
    assert float(clipped.scale[3, 0]) < float(plain.scale[3, 0])  # the outlier's group got a finer step
    rebuilt = dequantize_int(clipped.codes, clipped.scale, clipped.zero, 4)
    assert float(rebuilt[3, 17]) < 0.5  # the outlier itself was clipped before rounding
    auto = quantize_int(w, 4, 32, False, torch.float32, Clip("auto"))
    assert auto.threshold is None or auto.threshold < float(w.abs().max())


def test_group_must_divide_the_row():
    with pytest.raises(SwtoolError, match="does not divide"):
        quantize_int(weight(cols=96), 4, 64, False, torch.float16)


def test_fp8_per_channel():
    w = weight()
    values, scale = quantize_fp8(w, torch.bfloat16)
    assert values.dtype == FP8 and scale.shape == (24, 1) and scale.dtype == torch.bfloat16
    peaks = values.float().abs().amax(dim=1)
    assert bool((peaks <= 448).all()) and float(peaks.min()) > 400  # each row's largest weight near the top of E4M3
    rebuilt = dequantize_values(values, scale)
    assert rebuilt.dtype == torch.bfloat16
    assert float(((rebuilt.float() - w).abs() / w.abs().clamp(min=1e-3)).median()) < 0.05


def test_fp8_matches_the_package():
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    w = weight().half()
    values, scale = quantize_fp8(w, torch.float16)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    assert torch.equal(forward.quantize(w.float(), scale.float(), None, args, dtype=FP8).view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(forward.dequantize(values, scale, None, args), dequantize_values(values, scale))
