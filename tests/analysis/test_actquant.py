"""Simulated W8A8: RTN fake-quantization, the held-out super activation, SmoothQuant folding."""

from __future__ import annotations

import pytest
import torch

from swtool.actquant import (
    InputMaxima,
    fake_quant,
    fake_quant_activations,
    quantize_weights,
    smooth,
)
from swtool.errors import SwtoolError
from swtool.evaluate import Options, calibrate, perplexity
from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("w8a8")
    model = tiny.build("llama", directory, seed=3)
    tiny.plant(model, directory, [(1, 5, 7)])
    return directory


def test_per_token_rtn_has_one_scale_per_row():
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    q = fake_quant(x, 8, dim=-1)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((q - x).abs() <= scale / 2 + 1e-7)
    assert torch.allclose((q / scale).round(), q / scale, atol=1e-4)  # every value is a multiple of its row's scale
    assert torch.equal(q.abs().amax(-1), x.abs().amax(-1))  # the row's peak is exact
    w = torch.randn(16, 8)
    assert len(torch.unique((fake_quant(w, 4, dim=None) / (w.abs().max() / 7)).round())) <= 15  # one scale, 15 levels
    with pytest.raises(SwtoolError):
        fake_quant(w, 1, dim=None)


def test_keep_largest_restores_the_outlier_and_sharpens_its_row():
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    x[0, 0, 9] = 500.0  # a super activation in window 0
    naive = fake_quant_activations(x, 8)
    assert torch.equal(naive, fake_quant(x, 8, dim=-1))
    kept = fake_quant_activations(x, 8, keep_largest=True)
    assert kept[0, 0, 9] == 500.0
    row_error_naive = (naive[0, 0] - x[0, 0]).abs().max()
    row_error_kept = (kept[0, 0] - x[0, 0]).abs().max()
    assert row_error_kept < row_error_naive / 100  # the rest of the row no longer rounds to zero
    assert torch.count_nonzero(naive[0, 0]) == 1
    assert torch.equal(kept[0, 1:], naive[0, 1:])  # other tokens of window 0: unchanged
    largest_1 = x[1].abs().argmax()
    assert kept[1].flatten()[largest_1] == x[1].flatten()[largest_1]  # window 1 holds out its own largest value


def test_per_window_scale_and_its_held_out_outlier():
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(6)) * 0.1
    x[1, 2, 3] = 200.0
    naive = fake_quant_activations(x, 8, "tensor")
    assert torch.count_nonzero(naive[1]) == 1  # one scale for all of window 1: everything else rounds to zero
    assert torch.equal(naive[0], fake_quant(x[0], 8, dim=None))  # window 0 has its own scale
    kept = fake_quant_activations(x, 8, "tensor", keep_largest=True)
    assert kept[1, 2, 3] == 200.0
    assert (kept[1] - x[1]).abs().max() <= x[1].abs().flatten().topk(2).values[1] / 127 / 2 + 1e-7
    with pytest.raises(SwtoolError, match="granularity"):
        fake_quant_activations(x, 8, "channel")


def test_smoothing_keeps_the_function_and_flattens_activation_channels(tiny_model):
    checkpoint = open_checkpoint(tiny_model)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    maxima = calibrate(checkpoint, windows, batch=2, dtype=torch.float32, device="cpu", memory_limit=1 << 30)
    assert set(maxima) == {(layer, role) for layer in range(4) for role in ("q", "gate")}
    stream = LayerStream(checkpoint)
    h = stream.embed(windows)
    for layer in range(2):
        weights = stream.layer_weights(layer)
        smoothed = smooth(weights, {role: m for (i, role), m in maxima.items() if i == layer}, 0.85)
        assert not torch.equal(smoothed["q"], weights["q"])
        assert torch.allclose(stream.run_layer(layer, h, smoothed), stream.run_layer(layer, h, weights), rtol=1e-4, atol=1e-3)
        recorder = InputMaxima()
        LayerStream(checkpoint, input_hook=recorder).run_layer(layer, h, smoothed)
        before, after = maxima[(layer, "gate")], recorder.maxima[(layer, "gate")]
        assert after.max() / after.median() < before.max() / before.median()  # channel ranges closer together
        h = stream.run_layer(layer, h, weights)


def test_weight_quantization_touches_projections_only():
    weights = {"q": torch.randn(8, 8), "attn_norm": torch.randn(8) * 1.37}
    out = quantize_weights(weights, ["q"], 4)
    assert torch.equal(out["attn_norm"], weights["attn_norm"])
    assert not torch.equal(out["q"], weights["q"])


def test_w8a8_variants_on_a_model(tiny_model):
    checkpoint = open_checkpoint(tiny_model)
    windows = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    fp = perplexity(checkpoint, windows)
    w8a8 = perplexity(checkpoint, windows, Options(w_bits=8, a_bits=8))
    w4a4 = perplexity(checkpoint, windows, Options(w_bits=4, a_bits=4))
    kept = perplexity(checkpoint, windows, Options(w_bits=8, a_bits=8, keep_super_act=True))
    per_tensor = perplexity(checkpoint, windows, Options(w_bits=8, a_bits=8, a_granularity="tensor"))
    per_tensor_kept = perplexity(checkpoint, windows, Options(w_bits=8, a_bits=8, a_granularity="tensor", keep_super_act=True))
    assert abs(per_tensor_kept - fp) < abs(per_tensor - fp)
    assert fp != w8a8 and abs(w8a8 - fp) < abs(w4a4 - fp)
    assert abs(kept - fp) < abs(w8a8 - fp)  # the planted super activation is what hurts W8A8 here


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    """Channel outliers in a linear input: SmoothQuant (alpha 0.5) moves them into the weights, and W8A8 error drops."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 64, 32, generator=generator)
    x[..., [3, 17]] *= 80  # two outlier channels, as norms produce in LLMs
    w = torch.randn(48, 32, generator=generator) * 0.1
    weights = {"attn_norm": torch.ones(32), "q": w, "k": w[:8], "v": w[8:16]}
    smoothed = smooth(weights, {"q": x.abs().reshape(-1, 32).amax(0)}, 0.5)
    x_smooth = x * smoothed["attn_norm"]  # the norm weight now carries 1/s
    assert torch.allclose(x_smooth @ smoothed["q"].T, x @ w.T, rtol=1e-4, atol=1e-3)
    exact = x @ w.T

    def w8a8_error(inputs: torch.Tensor, weight: torch.Tensor) -> float:
        return float((fake_quant_activations(inputs, 8) @ fake_quant(weight, 8, dim=None).T - exact).abs().mean())

    assert w8a8_error(x_smooth, smoothed["q"]) < 0.7 * w8a8_error(x, w)
