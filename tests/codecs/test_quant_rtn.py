"""Block RTN, bit packing, hold-out and clipping, against a per-block reference written out longhand."""

from __future__ import annotations

import math

import pytest
import torch

from swtool.codecs import pack, rtn
from swtool.codecs.errors import NonFiniteError
from swtool.errors import SwtoolError


def weight(rows: int = 96, cols: int = 77, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


# -- packing --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001, (1 << 18) * 8 + 5])
def test_pack_roundtrip(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = pack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == pack.packed_size(count, bits)
    assert torch.equal(pack.unpack(packed, bits, count), codes)


def test_pack_layout_is_dense_little_endian():
    assert pack.pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack.pack(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b00000001]
    word = sum(j << (3 * j) for j in range(8))  # codes 0..7 in one 24-bit little-endian group
    assert pack.pack(torch.arange(8, dtype=torch.uint8), 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack.packed_size(9, 3) == 6 and pack.packed_size(5, 4) == 3 and pack.packed_size(5, 2) == 2


def test_unpack_refuses_wrong_size():
    with pytest.raises(SwtoolError, match="need"):
        pack.unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)


# -- RTN against a longhand reference ---------------------------------------------


def reference(w: torch.Tensor, bits: int, n: int, sym: bool):
    """Per block, one at a time: fp16 scale and zero, then floor((w - zero) / scale + 1/2) clamped."""
    flat = w.reshape(-1).float()
    scales, zeros, codes = [], [], []
    top = 2**bits - 1
    for start in range(0, flat.numel(), n):
        block = flat[start : start + n]
        if sym:
            half = 2 ** (bits - 1)
            scale = torch.tensor(float(block.abs().max()) / (half - 1)).half()
            zero = torch.tensor(float(scale) * -half).half()
        else:
            scale = torch.tensor((float(block.max()) - float(block.min())) / top).half()
            zero = torch.tensor(float(block.min())).half()
        s, z = float(scale), float(zero)
        q = [min(max(math.floor((float(v) - z) / s + 0.5), 0), top) if s > 0 else 0 for v in block]
        scales.append(s)
        zeros.append(z)
        codes += q
    return torch.tensor(scales), torch.tensor(zeros), torch.tensor(codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("block", [64, 1000, "channel", "tensor"])
def test_matches_reference_and_error_bound(bits, sym, block):
    w = weight(40, 77).bfloat16()
    spec = rtn.QuantSpec(bits, block, sym)
    q = rtn.quantize(w, spec)
    n = spec.block_length(w.shape)
    scales, zeros, codes = reference(w, bits, n, sym)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert torch.equal(q.scale.float(), scales) and torch.equal(q.zero.float(), zeros)
    got = pack.unpack(q.codes, bits, w.numel()).long()
    assert (got != codes).float().mean() < 1e-3  # float rounding may flip an exact tie, nothing more
    assert (got - codes).abs().max() <= 1
    rebuilt = rtn.dequantize(q)
    assert rebuilt.shape == w.shape
    bound = q.scale.float().repeat_interleave(n)[: w.numel()].view(w.shape) * 0.5 + 1e-6
    assert ((rebuilt - w.float()).abs() <= bound * 1.001).all()


def test_block_counts_and_shorter_last_block():
    w = weight(30, 77)  # 2310 elements
    assert rtn.quantize(w, rtn.QuantSpec(4, 1000)).scale.numel() == 3
    assert rtn.quantize(w, rtn.QuantSpec(4, "channel")).scale.numel() == 30
    assert rtn.quantize(w, rtn.QuantSpec(4, "tensor")).scale.numel() == 1
    w.view(-1)[2000:] *= 0.01  # the last block (310 elements) is tiny: it must get its own, tiny scale
    q = rtn.quantize(w, rtn.QuantSpec(4, 1000))
    tail = w.view(-1)[2000:]
    assert float(q.scale[2]) == float(torch.tensor(float(tail.max() - tail.min()) / 15).half())
    assert float(q.scale[2]) < float(q.scale[1]) / 20


def test_hold_out_keeps_the_range_and_restores_exactly():
    w = weight(64, 64)
    w[10, 20] = 3.3  # 60x the typical magnitude: a super weight
    spec = rtn.QuantSpec(4, 256)
    plain = rtn.quantize(w, spec)
    held = rtn.quantize(w, spec, held=[(10, 20)])
    block = (10 * 64 + 20) // 256
    assert float(plain.scale[block]) > 10 * float(held.scale[block])
    others = [b for b in range(plain.scale.numel()) if b != block]
    assert torch.equal(plain.scale[others], held.scale[others])
    rebuilt = rtn.dequantize(held)
    assert float(rebuilt[10, 20]) == float(torch.tensor(3.3).half())
    assert held.held == [(10, 20, float(torch.tensor(3.3).half()))]
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[10, 20] = False
    assert (rebuilt - w)[mask].abs().max() < (rtn.dequantize(plain) - w)[mask].abs().max() / 5
    assert w[10, 20] == 3.3  # the caller's tensor is untouched


def test_hold_out_uses_median_of_the_rest():
    w = torch.arange(16, dtype=torch.float32).view(2, 8)
    w[0, 3] = 1000.0
    q = rtn.quantize(w, rtn.QuantSpec(8, 8), held=[(0, 3)])
    # block 0 without the held weight is {0,1,2,4,5,6,7}: median 4, so the range stays [0, 7]
    assert float(q.scale[0]) == float(torch.tensor(7 / 255).half())
    assert float(rtn.dequantize(q)[0, 3]) == 1000.0


def test_clip_z_and_pct_clamp_per_block_but_never_held_weights():
    w = weight(32, 64)
    w[3, 5] = 2.0  # held
    w[20, 7] = 1.0  # an ordinary outlier: clipped
    for clip in (rtn.Clip("z", 3.0), rtn.Clip("pct", 0.01)):
        q = rtn.quantize(w, rtn.QuantSpec(8, 512, clip=clip), held=[(3, 5)])
        rebuilt = rtn.dequantize(q)
        assert float(rebuilt[3, 5]) == float(torch.tensor(2.0).half())
        assert float(rebuilt[20, 7]) < 0.5
    block = w.view(-1)[1280:1792].abs()
    threshold = float(block.mean() + 3 * block.std(correction=0))
    rebuilt = rtn.dequantize(rtn.quantize(w, rtn.QuantSpec(8, 512, clip=rtn.Clip("z", 3.0))))
    assert abs(float(rebuilt[20, 7]) - threshold) < 0.01


def test_clip_auto_never_worse_than_no_clip_and_clips_heavy_tails():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((128, 128)) * 0.02  # heavy tails, as in LLM weights
    spec = rtn.QuantSpec(4, "tensor")
    plain = rtn.dequantize(rtn.quantize(w, spec))
    q = rtn.quantize(w, rtn.QuantSpec(4, "tensor", clip=rtn.Clip("auto")))
    assert q.threshold is not None and q.threshold < float(w.abs().max())
    assert float(((rtn.dequantize(q) - w) ** 2).sum()) < float(((plain - w) ** 2).sum())
    uniform = torch.rand(64, 64, generator=torch.Generator().manual_seed(2)) - 0.5  # nothing to gain from clipping
    assert rtn.quantize(uniform, rtn.QuantSpec(8, 64, clip=rtn.Clip("auto"))).threshold is None


def test_clip_auto_weighted_by_input_keeps_a_weight_that_reads_a_massive_activation():
    # The bug SmolLM2 showed: the largest weights of a down_proj read the super activation's
    # channel, and least-MSE clipping (every element alike) cut them to a fraction of their size.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02
    spots = torch.randint(0, w.numel(), (20,), generator=g)  # ordinary outliers, 10-15 std
    w.view(-1)[spots] = (torch.rand(20, generator=g) * 0.1 + 0.2) * torch.randn(20, generator=g).sign()
    w[5, 7] = 0.4
    importance = torch.ones(128)
    importance[7] = 1e4  # column 7's input is massive, as at a super activation
    spec = rtn.QuantSpec(4, "tensor", clip=rtn.Clip("auto"))
    plain, weighted = rtn.quantize(w, spec), rtn.quantize(w, spec, importance=importance)
    assert plain.threshold is not None and plain.threshold < 0.5 * 0.4  # least plain MSE clips it
    assert weighted.threshold is None or weighted.threshold >= 0.4
    x = torch.randn(128, 64, generator=g) * importance.sqrt()[:, None]  # inputs with those mean squares
    output_error = {name: float(((rtn.dequantize(q) - w) @ x).pow(2).sum()) for name, q in (("plain", plain), ("weighted", weighted))}
    assert output_error["weighted"] < output_error["plain"] / 3
    with pytest.raises(ValueError, match="column weights"):
        rtn.quantize(w, spec, importance=torch.ones(127))


def test_clip_auto_weighted_still_clips_where_inputs_are_even():
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((128, 128)) * 0.02
    spec = rtn.QuantSpec(4, "tensor", clip=rtn.Clip("auto"))
    assert rtn.quantize(w, spec, importance=torch.full((128,), 3.0)).threshold == rtn.quantize(w, spec).threshold is not None


def test_clip_auto_threshold_independent_of_chunks_and_workers(monkeypatch):
    from swtool.workers import parallel_chunks

    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.0).sample((64, 100)).reshape(-1) * 0.02
    importance = torch.rand(100) + 0.1
    whole = rtn.auto_threshold(w.clone(), 300, 4, False, importance)
    monkeypatch.setattr(rtn, "CHUNK", 900)  # several chunks, and a shorter last block
    with parallel_chunks(2):
        chunked = rtn.auto_threshold(w.clone(), 300, 4, False, importance)
    assert whole is not None and chunked == whole


def test_deterministic_and_dtype_independent():
    w = weight().bfloat16()
    spec = rtn.QuantSpec(3, 100)
    a, b = rtn.quantize(w, spec), rtn.quantize(w.clone(), spec)
    c = rtn.quantize(w.float(), spec)
    for x, y in ((a, b), (a, c)):
        assert torch.equal(x.codes, y.codes) and torch.equal(x.scale, y.scale) and torch.equal(x.zero, y.zero)


@pytest.mark.parametrize("text", ["0", "-4", "abc", "1.5", ""])
def test_bad_block(text):
    with pytest.raises(SwtoolError, match="--block"):
        rtn.parse_block(text)


@pytest.mark.parametrize("bits", [0, 1, 5, 16])
def test_bad_bits(bits):
    with pytest.raises(SwtoolError, match="--bits"):
        rtn.check_bits(bits)


@pytest.mark.parametrize("text", ["z:-1", "z:", "pct:1.5", "pct:0", "foo", "auto:3", "z:nan"])
def test_bad_clip(text):
    with pytest.raises(SwtoolError, match="--clip"):
        rtn.parse_clip(text)


def test_parse_good_values():
    assert rtn.parse_block("512") == 512 and rtn.parse_block("channel") == "channel"
    assert str(rtn.parse_clip("z:3")) == "z:3" and str(rtn.parse_clip("pct:0.001")) == "pct:0.001"
    assert rtn.parse_clip("auto").kind == "auto" and rtn.parse_clip("none").kind == "none"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("clip", [rtn.Clip(), rtn.Clip("z", 3.0), rtn.Clip("auto")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nonfinite_values_raise_nonfinite_error_under_every_rule(bad, clip, dtype):
    """The writers load the weights unchecked and rely on quantize to find NaN/Inf (swtool.formats.rtn.writer)."""
    w = weight(16, 96).to(dtype)
    w[9, 70] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        rtn.quantize(w, rtn.QuantSpec(4, 32, clip=clip), held=[(2, 3)])
    with pytest.raises(NonFiniteError):
        rtn.quantize(w, rtn.QuantSpec(4, 32))
