"""Every supported family's forward matches transformers on a tiny random model.

For each family we build a tiny fp32 model with transformers (tests/tiny.py),
read it back through swtool's checkpoint reader and run swtool's layer-by-layer
forward on two prompts longer than any sliding window. Compared, at a tolerance
of 1e-4 relative to each tensor's scale: the hidden state after every layer
(transformers' `output_hidden_states`, and forward hooks on its decoder layers
for the last one, which `output_hidden_states` reports after the final norm),
every down projection's input and output (forward hooks on transformers'
`down_proj` modules; for routed experts the calls of F.linear on each expert's
slice of the 3D `down_proj` parameter), and the logits.
"""

from __future__ import annotations

import pytest
import torch
from tiny import build

from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    ("qwen3", {}),
    ("phi3", {}),
    ("olmo", {}),
    ("olmo2", {}),
    ("gemma", {}),
    ("gemma2", {}),
    ("gemma3_text", {}),
    ("mixtral", {}),
]
IDS = ["llama", "llama-tied", "llama-rope-llama3", "llama-attention-bias", "mistral-sliding", "qwen2", "qwen2-sliding-upper-layers", "qwen3", "phi3-partial-rotary", "olmo-clip-qkv", "olmo2", "gemma", "gemma2", "gemma3_text", "mixtral"]

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")


def reference(model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """transformers' hidden states, layer outputs, down_proj inputs/outputs and logits."""
    layer_out: dict[int, torch.Tensor] = {}
    downs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(model.model.layers):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
        if hasattr(block.mlp, "down_proj"):
            handles.append(block.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: downs.__setitem__((i, None), (a[0], o))))
    expert_slices, routing = {}, {}
    for i, block in enumerate(model.model.layers):
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:
            model.set_experts_implementation("eager")  # the per-expert loop, whose F.linear calls we can see
            for e in range(experts.down_proj.shape[0]):
                expert_slices[experts.down_proj[e].data_ptr()] = (i, e)
            handles.append(block.mlp.gate.register_forward_hook(lambda m, a, o, i=i: routing.__setitem__(i, o[2])))
    linear = torch.nn.functional.linear
    calls = []

    def spy(x, weight, bias=None):
        y = linear(x, weight, bias)
        if weight.data_ptr() in expert_slices and weight.dim() == 2 and weight.shape[1] == x.shape[-1]:
            calls.append((expert_slices[weight.data_ptr()], x, y))
        return y

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
    finally:
        torch.nn.functional.linear = linear
        for h in handles:
            h.remove()
    batch, length = tokens.shape
    for (layer, expert), x, y in calls:  # scatter each expert's routed rows back to (B, T, .) in transformers' order
        mask = torch.nn.functional.one_hot(routing[layer], num_classes=model.config.num_local_experts + 1).permute(2, 1, 0)
        _, token_idx = torch.where(mask[expert])
        dense_x = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, token_idx, x)
        dense_y = y.new_zeros(batch * length, y.shape[-1]).index_copy(0, token_idx, y)
        downs[(layer, expert)] = (dense_x.view(batch, length, -1), dense_y.view(batch, length, -1))
    return {"hidden": out.hidden_states, "layers": layer_out, "downs": downs, "logits": out.logits}


LONGROPE = {
    "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
    },
    "original_max_position_embeddings": 8,  # Phi3Config's own field, which overrides the one above
}
"""Phi-3's LongRoPE with an original context of 8 tokens: the 12-token prompts take the long factors."""


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=IDS)
def test_forward_matches_transformers(tmp_path, family, overrides):
    check_against_transformers(tmp_path, family, overrides, TOKENS)


@pytest.mark.parametrize("length", [12, 6], ids=["long-factors", "short-factors"])
def test_phi3_longrope_matches_transformers(tmp_path, length):
    check_against_transformers(tmp_path, "phi3", LONGROPE, TOKENS[:, :length])


def check_against_transformers(tmp_path, family: str, overrides: dict, tokens: torch.Tensor, device: str = "cpu") -> None:
    """swtool's forward on `device` against transformers' on the CPU."""
    model = build(family, tmp_path, **overrides)
    ref = reference(model, tokens)
    stream = LayerStream(open_checkpoint(tmp_path), device=device)
    assert stream.config.num_layers == len(model.model.layers)
    downs = {}

    def hook(layer, x, y, expert=None, routed=None):
        downs[(layer, expert)] = (x, y)

    h = stream.embed(tokens)
    close(h, ref["hidden"][0], "embeddings")
    for layer in stream.layers():
        h = stream.run_layer(layer, h, hook=hook)
        close(h, ref["layers"][layer], f"layer {layer} output")
        if layer < stream.config.num_layers - 1:
            close(h, ref["hidden"][layer + 1], f"hidden state after layer {layer}")
    assert set(downs) == set(ref["downs"])
    for key, (x, y) in downs.items():
        close(x, ref["downs"][key][0], f"down input {key}")
        close(y, ref["downs"][key][1], f"down output {key}")
    close(stream.logits(h), ref["logits"], "logits")


def test_sliding_window_matters(tmp_path):
    """The Mistral case is a real test of the window: without it the hidden states differ."""
    model = build("mistral", tmp_path)
    ref = reference(model, TOKENS)
    stream = LayerStream(open_checkpoint(tmp_path))
    object.__setattr__(stream.config, "sliding_window", None)
    h = stream.run_layer(0, stream.embed(TOKENS))
    assert float((h - ref["layers"][0]).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("raw", "sliding"),
    [
        ({"model_type": "gemma2", "sliding_window": 4096}, (True, False, True, False, True, False)),
        ({"model_type": "gemma3_text", "sliding_window": 512}, (True, True, True, True, True, False)),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 4}, (False,) * 4 + (True,) * 2),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, ()),
        ({"model_type": "mistral", "sliding_window": 4096}, ()),  # every layer
    ],
)
def test_sliding_layers_of_configs_without_layer_types(raw, sliding):
    """transformers v4 configs (still common on the Hub) imply which layers slide instead of listing `layer_types`."""
    from swtool.families.config import from_hf

    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 6, "vocab_size": 300}
    config = from_hf({**base, **raw})
    assert config.sliding_layers == sliding


def test_gemma3_v4_config_rope_bases():
    from swtool.families.config import from_hf

    raw = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 6,
           "vocab_size": 300, "sliding_window": 512, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    config = from_hf(raw)
    assert (config.rope_theta, config.local_rope_theta, config.rope_scaling) == (1000000.0, 10000.0, {"rope_type": "linear", "factor": 8.0})
