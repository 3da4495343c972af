"""plan_gguf at a K-quant mix: llama-quantize's per-tensor types (swtool.formats.gguf.mixes) on a real checkpoint."""

from __future__ import annotations

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from swtool.formats.base import Held
from swtool.formats.open import open_checkpoint
from swtool.formats.gguf.writer import plan_gguf, save_gguf

LAYERS = 8


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """A tiny llama whose rows (256) K-quants can take: 8 layers, GQA 2, untied head."""
    from tests.helpers.tiny import build

    directory = tmp_path_factory.mktemp("llama256")
    build("llama", directory, hidden_size=256, intermediate_size=256, num_hidden_layers=LAYERS)
    return directory


def types(plan) -> dict[str, T]:
    return {t.name: t.qtype for t in plan.tensors}


def test_q4_k_m_gives_the_sensitive_tensors_more_bits(llama256):
    plan = plan_gguf(open_checkpoint(llama256), "q4_k_m")
    got = types(plan)
    # use_more_bits with 8 layers: the first and last eighth (0, 7) and (i - 1) % 3 == 2 (3, 6); one attn_v a layer
    bumped = {0, 3, 6, 7}
    for layer in range(LAYERS):
        want = T.Q6_K if layer in bumped else T.Q4_K
        assert got[f"blk.{layer}.ffn_down.weight"] == want, layer
        assert got[f"blk.{layer}.attn_v.weight"] == want, layer
        assert got[f"blk.{layer}.attn_q.weight"] == T.Q4_K
        assert got[f"blk.{layer}.attn_norm.weight"] == T.F32
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == T.Q4_K
    assert plan.metadata["general.file_type"].value == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert not [note for note in plan.notes if "row length" in note]


def test_a_gguf_input_plans_as_its_hf_source(llama256, tmp_path):
    """The rules read the GGUF's own key/values and types; a F16 GGUF of the model gives the same mix."""
    checkpoint = open_checkpoint(llama256)
    source = tmp_path / "f16.gguf"
    save_gguf(checkpoint, plan_gguf(checkpoint, "F16"), source)
    for mix in ("Q2_K", "Q3_K_M", "Q5_K_M"):
        assert types(plan_gguf(open_checkpoint(source), mix)) == types(plan_gguf(checkpoint, mix)), mix


def test_super_weight_tensor_keeps_at_least_the_super_type(llama256):
    checkpoint = open_checkpoint(llama256)
    held = [Held("model.layers.2.mlp.down_proj.weight", 3, 5)]
    got = types(plan_gguf(checkpoint, "Q3_K_S", super_weights=held, keep_super=True))
    assert got["blk.2.ffn_down.weight"] == T.Q8_0
    assert got["blk.3.ffn_down.weight"] == T.Q3_K
    assert types(plan_gguf(checkpoint, "Q3_K_S", super_weights=held, keep_super=True, super_type="F16"))["blk.2.ffn_down.weight"] == T.F16


def test_short_rows_fall_back_with_one_note_each(tmp_path):
    from tests.helpers.tiny import build

    build("llama", tmp_path, num_hidden_layers=2)  # rows of 64 and 128: no K-quant block fits
    plan = plan_gguf(open_checkpoint(tmp_path), "Q4_K_S")
    got = types(plan)
    assert got["blk.0.attn_q.weight"] == T.Q5_0 and got["blk.0.attn_v.weight"] == T.Q5_1  # Q4_K -> Q5_0, Q5_K -> Q5_1
    assert got["output.weight"] == T.Q8_0  # the head rule, not a fallback: no note
    fell = [t.name for t in plan.tensors if t.qtype in (T.Q5_0, T.Q5_1)]
    assert len([n for n in plan.notes if "as llama-quantize does" in n]) == len(fell)
