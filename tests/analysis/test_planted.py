"""Detection across families: planted super weights are found exactly, and nothing is found without a plant.

`tiny.plant` makes a super weight the way real ones look: a large
W_down[row, col] fed by an amplified input channel `col`. For routed experts
the weight goes into one expert's down projection and must be reported with
that expert's index.
"""

from __future__ import annotations

import pytest

from swtool.detect import scan
from swtool.formats.open import open_checkpoint
from tests.helpers.families import FAMILIES
from tests.helpers.tiny import build, plant


def found(result) -> list[tuple]:
    return sorted((c.layer, c.row, c.col, c.expert) for c in result.super_weights)


def planted(weights) -> list[tuple]:
    return sorted((w[0], w[1], w[2], w[3] if len(w) > 3 else None) for w in weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_planted_weight_is_found_and_nothing_without_it(tmp_path, family):
    model = build(family, tmp_path, seed=1)
    clean = scan(open_checkpoint(tmp_path))
    assert clean.super_weights == [] and clean.candidates == []
    weights = [(1, 5, 17, 0)] if family == "mixtral" else [(1, 5, 17)]
    plant(model, tmp_path, weights)
    result = scan(open_checkpoint(tmp_path))
    assert found(result) == planted(weights)
    cand = result.super_weights[0]
    down = "model.layers.1.block_sparse_moe.experts.0.w2.weight" if family == "mixtral" else "model.layers.1.mlp.down_proj.weight"
    assert cand.tensor == down
    assert cand.value == pytest.approx(30.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "olmo2", "gemma", "gemma3_text", "mixtral"])
def test_two_weights_sharing_a_column_are_both_found(tmp_path, family):
    """The second spike hides behind the first (one spike per layer per variant) and is found once the first is zeroed.

    Thresholds are relaxed here: in a tiny random model two coexisting massive
    activations both dominate the final norm, so zeroing either leaves the
    other and moves predictions by a fraction of a nat. The spurious spikes
    that appear once both are zeroed (channel `col` is still amplified) must
    still be rejected by their effect.
    """
    model = build(family, tmp_path, seed=1)
    expert = (1,) if family == "mixtral" else ()
    weights = [(2, 9, 40, *expert), (2, 30, 40, *expert)]
    plant(model, tmp_path, weights)
    result = scan(open_checkpoint(tmp_path), min_effect=0.1, relative_effect=0.0)
    assert found(result) == planted(weights)
    assert sorted(c.round for c in result.super_weights) == [1, 2]  # the second was found with the first zeroed

