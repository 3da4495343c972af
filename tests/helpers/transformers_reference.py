"""transformers as the numerical reference for swtool's forward, layer by layer.

`reference` records, for a transformers model, the hidden state after every layer
(`output_hidden_states`, and forward hooks on its decoder layers for the last one,
which `output_hidden_states` reports after the final norm), every down projection's
input and output (forward hooks on `down_proj` modules; for routed experts the calls of
F.linear on each expert's slice of the 3D `down_proj` parameter) and the logits;
`check_against_transformers` compares swtool's forward with all of them at a
tolerance of 1e-4 relative to each tensor's scale.
"""

from __future__ import annotations

import torch

from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream
from tests.helpers.tiny import build

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
