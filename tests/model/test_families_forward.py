"""Every supported family's forward matches transformers on a tiny random model.

For each family case (tests/helpers/families.py) we build a tiny fp32 model with
transformers (tests/helpers/tiny.py), read it back through swtool's checkpoint
reader and run swtool's layer-by-layer forward on two prompts longer than any
sliding window. Compared (tests/helpers/transformers_reference.py), at a tolerance
of 1e-4 relative to each tensor's scale: the hidden state after every layer,
every down projection's input and output, and the logits.
"""

from __future__ import annotations

import pytest

from swtool.formats.open import open_checkpoint
from swtool.model.forward import LayerStream
from tests.helpers.families import FORWARD_CASES, FORWARD_IDS
from tests.helpers.tiny import build
from tests.helpers.transformers_reference import TOKENS, check_against_transformers, reference

LONGROPE = {
    "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
    },
    "original_max_position_embeddings": 8,  # Phi3Config's own field, which overrides the one above
}
"""Phi-3's LongRoPE with an original context of 8 tokens: the 12-token prompts take the long factors."""


@pytest.mark.parametrize(("family", "overrides"), FORWARD_CASES, ids=FORWARD_IDS)
def test_forward_matches_transformers(tmp_path, family, overrides):
    check_against_transformers(tmp_path, family, overrides, TOKENS)


@pytest.mark.parametrize("length", [12, 6], ids=["long-factors", "short-factors"])
def test_phi3_longrope_matches_transformers(tmp_path, length):
    check_against_transformers(tmp_path, "phi3", LONGROPE, TOKENS[:, :length])


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
