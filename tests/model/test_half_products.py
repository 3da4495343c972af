"""Matrices kept in 16 bits: the C product for small batches, the widened products of eval's windows, the streams.

The scan multiplies a prompt's few rows by every weight; reading bf16/fp16 weights
in place (instead of converting each layer to fp32 first) must change nothing but
the rounding of float32 sums. Eval and imatrix keep the layers in 16 bits too and
widen each matrix for its product: that must change nothing at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from swtool import native
from swtool.detect import scan
from swtool.evaluate import perplexity
from swtool.formats.open import open_checkpoint
from swtool.model.forward import (
    PRODUCT_BAND_ROWS,
    SMALL_BATCH_ROWS,
    LayerStream,
    WideBuffer,
    product,
)
from swtool.model.windows import stream_windows
from swtool.workers import parallel_chunks
from tests.helpers.tiny import build, plant

needs_kernel = pytest.mark.skipif(native.product_kernels() is None, reason=f"no vectorised C product here ({native.status})")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 5, 33, SMALL_BATCH_ROWS])
@pytest.mark.parametrize("shape", [(8, 16), (37, 2500), (PRODUCT_BAND_ROWS + 3, 70)])  # column tails and chunks, row tails, bands
def test_product_of_16_bit_weights_matches_float64(dtype, rows, shape):
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(shape, generator=generator) * 0.1).to(dtype)
    x = torch.randn(1, rows, shape[1], generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    expected = reference(x, weight, bias)
    scale = reference(x.abs(), weight.float().abs(), None).max()  # sum of |terms|: what float32 rounding is relative to
    for workers in (1, 2):
        with parallel_chunks(workers):
            y = product(x, weight, bias)
        assert y.shape == (1, rows, shape[0]) and y.dtype == torch.float32
        assert float((y.double() - expected).abs().max()) <= 1e-6 * float(scale)


def test_many_rows_or_no_kernel_take_torchs_product(monkeypatch):
    weight = torch.randn(24, 40).to(torch.bfloat16)
    x = torch.randn(SMALL_BATCH_ROWS + 1, 40)
    assert torch.equal(product(x, weight), F.linear(x, weight.float()))
    monkeypatch.setattr(native, "kernels", lambda: None)
    assert torch.equal(product(x[:3], weight), F.linear(x[:3], weight.float()))


def test_wide_buffer_gives_float32_products_exactly_in_one_reused_buffer():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, SMALL_BATCH_ROWS, 40, generator=generator)  # 96 rows: torch's product
    small, large = (torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in ((24, 40), (70, 40)))
    wide = WideBuffer()
    assert torch.equal(product(x, small, wide=wide), F.linear(x, small.float()))
    assert torch.equal(product(x, large, wide=wide), F.linear(x, large.float()))  # grows the buffer
    grown = wide.widen(large, torch.float32).data_ptr()
    assert torch.equal(product(x, small, wide=wide), F.linear(x, small.float()))
    assert wide.widen(small, torch.float32).data_ptr() == grown  # a smaller matrix reuses it


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny Llama stored in bf16 with a planted super weight at layer 1 [7, 40]."""
    directory = tmp_path_factory.mktemp("tiny-bf16")
    model = build("llama", directory)
    plant(model, directory, [(1, 7, 40)])
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(directory / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@needs_kernel
def test_small_batches_keep_matrices_in_16_bits_and_match_the_float32_forward(bf16_model):
    checkpoint = open_checkpoint(bf16_model)
    tokens = torch.tensor([list(range(40, 51))])
    kept, converted = LayerStream(checkpoint), LayerStream(checkpoint)
    kept.expect_rows(tokens.numel())
    weights = kept.layer_weights(0)
    assert weights["down"].dtype == weights["q"].dtype == torch.bfloat16
    assert weights["attn_norm"].dtype == torch.float32  # vectors are converted: only products read 16 bits
    assert all(tensor.dtype == torch.float32 for tensor in converted.layer_weights(0).values())
    h_kept = h_converted = kept.embed(tokens)
    for (layer, w_kept), (_, w_converted) in zip(kept.walk(), converted.walk()):
        h_kept = kept.run_layer(layer, h_kept, w_kept)
        h_converted = converted.run_layer(layer, h_converted, w_converted)
        assert torch.allclose(h_kept, h_converted, rtol=1e-5, atol=1e-5), layer
    assert torch.allclose(kept.logits(h_kept), converted.logits(h_converted), rtol=1e-5, atol=1e-4)
    kept.expect_rows(SMALL_BATCH_ROWS + 1)  # many rows: torch's float32 products are faster
    assert kept.layer_weights(0)["down"].dtype == torch.float32


def test_without_the_kernel_everything_loads_in_the_compute_dtype(bf16_model, monkeypatch):
    monkeypatch.setattr(native, "kernels", lambda: None)
    stream = LayerStream(open_checkpoint(bf16_model))
    stream.expect_rows(11)
    assert not stream.keep_16bit and stream.layer_weights(0)["down"].dtype == torch.float32


def test_scan_of_a_bf16_checkpoint_is_the_same_with_either_product(bf16_model, monkeypatch):
    fast = scan(open_checkpoint(bf16_model))
    monkeypatch.setattr(native, "kernels", lambda: None)
    slow = scan(open_checkpoint(bf16_model))
    assert [(c.layer, c.row, c.col, c.is_super) for c in fast.candidates] == [(c.layer, c.row, c.col, c.is_super) for c in slow.candidates]
    assert (1, 7, 40) in [(c.layer, c.row, c.col) for c in fast.candidates]
    assert [c.ppl_ratio for c in fast.candidates] == pytest.approx([c.ppl_ratio for c in slow.candidates], nan_ok=True)
    for a, b in zip(fast.candidates, slow.candidates):
        assert a.activation == pytest.approx(b.activation, rel=1e-4) and a.effect == pytest.approx(b.effect, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("dropped", [{"avx512f"}, {"avx512f", "avx2", "fma"}], ids=["avx2", "scalar"])
def test_builds_for_other_instruction_sets_give_the_same_products(dropped, monkeypatch):
    """This machine's build takes the AVX-512 path; the AVX2 and plain-C ones are built here as a CPU without them would."""
    cpu = native._cpu_flags()
    if "avx512f" not in cpu or not {"avx2", "fma"} <= cpu:
        pytest.skip("the default build already is the one this would test")
    monkeypatch.setattr(native, "_cpu_flags", lambda: cpu - dropped)
    native.kernels.cache_clear()
    try:
        lib = native.kernels()
        if lib is None:
            pytest.skip(native.status)
        assert bool(lib.linear_half_vectorised()) == ("avx2" not in dropped)
        generator = torch.Generator().manual_seed(3)
        for dtype in (torch.bfloat16, torch.float16):
            weight = (torch.randn(37, 2500, generator=generator) * 0.1).to(dtype)
            x = torch.randn(5, 2500, generator=generator)
            y = torch.empty(5, 37)
            lib.linear_half(x.data_ptr(), 5, 2500, weight.data_ptr(), native.dtype_code(dtype), 37, y.data_ptr(), 37)
            scale = reference(x.abs(), weight.float().abs(), None).max()
            assert float((y.double() - reference(x, weight, None)).abs().max()) <= 1e-6 * float(scale)
    finally:
        native.kernels.cache_clear()  # the next caller builds (or finds) this machine's own library again


def test_windows_keep_16_bit_layers_and_get_the_float32_results_exactly(bf16_model):
    """stream_windows (eval, imatrix) loads bf16 matrices as they are; a weights hook gets float32 ones."""
    checkpoint = open_checkpoint(bf16_model)
    windows = torch.randint(0, 256, (4, 50), generator=torch.Generator().manual_seed(2))  # batches of 100 rows
    seen: dict[str, set[torch.dtype]] = {"kept": set(), "hooked": set()}

    def run(kind: str, hook) -> torch.Tensor:
        stream = LayerStream(checkpoint)
        walk = stream.walk

        def watched(*args, **kwargs):
            for layer, weights in walk(*args, **kwargs):
                seen[kind].add(weights["down"].dtype)
                yield layer, weights

        stream.walk = watched
        hidden = torch.empty(4, 50, checkpoint.config.hidden_size)
        stream_windows(stream, windows, hidden, 2, hook)
        return hidden

    kept, hooked = run("kept", None), run("hooked", lambda layer, weights: weights)
    assert seen == {"kept": {torch.bfloat16}, "hooked": {torch.float32}}
    assert torch.equal(kept, hooked)
    assert perplexity(checkpoint, windows, batch=2) == perplexity(checkpoint, windows, batch=2, transform=lambda layer, weights: weights)
