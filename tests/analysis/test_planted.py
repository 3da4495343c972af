"""Detection across families: planted weights are found exactly among the candidates, and nothing without a plant.

`tiny.plant` makes a super weight the way real ones look: a large
W_down[row, col] fed by an amplified input channel `col`. For routed experts
the weight goes into one expert's down projection and must be reported with
that expert's index. These tests check the search path only: a tiny random
model's perplexity does not depend on the planted weight, so the verdict
(tests/test_verdict.py) cannot call it a super weight here.
"""

from __future__ import annotations

import pytest

from swtool.detect import scan
from swtool.formats.open import open_checkpoint
from tests.helpers.families import FAMILIES
from tests.helpers.tiny import build, plant


def found(result) -> list[tuple]:
    return sorted((c.layer, c.row, c.col, c.expert) for c in result.candidates)


def planted(weights) -> list[tuple]:
    return sorted((w[0], w[1], w[2], w[3] if len(w) > 3 else None) for w in weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_planted_weight_is_a_candidate_and_nothing_without_it(tmp_path, family):
    model = build(family, tmp_path, seed=1)
    clean = scan(open_checkpoint(tmp_path))
    assert clean.super_weights == [] and clean.candidates == []
    weights = [(1, 5, 17, 0)] if family == "mixtral" else [(1, 5, 17)]
    plant(model, tmp_path, weights)
    result = scan(open_checkpoint(tmp_path))
    assert set(planted(weights)) <= set(found(result))
    cand = max(result.candidates, key=lambda c: c.effect)  # the planted weight ranks first: it is verified first
    assert (cand.layer, cand.row, cand.col, cand.expert) == planted(weights)[0]
    assert cand.effect >= 0.5 and cand.ppl_ratio == cand.ppl_ratio  # screened in, and verified by perplexity
    assert cand.is_super == (cand.ppl_ratio >= 2.0) and result.super_weights == [c for c in result.candidates if c.is_super]
    down = "model.layers.1.block_sparse_moe.experts.0.w2.weight" if family == "mixtral" else "model.layers.1.mlp.down_proj.weight"
    assert cand.tensor == down
    assert cand.value == pytest.approx(30.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "olmo2", "gemma", "gemma3_text", "mixtral"])
def test_two_weights_sharing_a_column_are_both_candidates(tmp_path, family):
    """The second spike hides behind the first (one spike per layer per variant) and is found once the first is zeroed.

    Thresholds are relaxed here: in a tiny random model two coexisting massive
    activations both dominate the final norm, so zeroing either leaves the
    other and moves predictions by a fraction of a nat. The spurious spikes
    that appear once both are zeroed (channel `col` is still amplified) must
    still be screened out by their effect.
    """
    model = build(family, tmp_path, seed=1)
    expert = (1,) if family == "mixtral" else ()
    weights = [(2, 9, 40, *expert), (2, 30, 40, *expert)]
    plant(model, tmp_path, weights)
    result = scan(open_checkpoint(tmp_path), min_effect=0.1)
    both = [c for c in result.candidates if (c.layer, c.row, c.col) in {w[:3] for w in weights}]
    assert sorted((c.layer, c.row, c.col, c.expert) for c in both) == planted(weights)
    assert sorted(c.round for c in both) == [1, 2]  # the second was found with the first zeroed
    assert all(c.effect >= 0.1 for c in both)
    others = [c for c in result.candidates if c not in both]
    assert all(c.effect < 0.1 and c.unverified is not None for c in others)  # screened out, never verified

