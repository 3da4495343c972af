"""GGUF output: names, types, metadata and data as llama.cpp's conventions want them, streamed and atomic."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from swtool.errors import SwtoolError
from swtool.formats.base import Held
from swtool.formats.gguf.reader import permute_qk, unpermute_qk
from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.open import open_checkpoint
from tests.helpers.forward import logits
from tests.helpers.gguf_files import fields, write
from tests.helpers.tiny import build, plant

SUPER = (1, 5, 17)  # layer, row, col of the planted super weight
SUPER_VALUE = 30.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama (GQA, untied head) with a planted super weight, as an HF directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = build("llama", directory)
    plant(model, directory, [SUPER], value=SUPER_VALUE)
    return directory


def test_names_types_and_metadata_follow_llama_cpp(tiny, tmp_path):
    checkpoint = open_checkpoint(tiny)
    plan, reader = write(checkpoint, tmp_path / "m.gguf", "Q4_0")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q4_0"  # untied embedding: the base type, as llama-quantize
    assert types["output.weight"] == "Q8_0"  # the head: kept at 8 bits
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.3.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    assert len(types) == 2 + 1 + 4 * 9
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight"] == [64, 32]  # GGUF order (in, out)
    meta = fields(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert meta["general.quantization_version"] == 2
    config = checkpoint.config
    assert meta["llama.block_count"] == 4 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.feed_forward_length"] == 128
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    # tokenizer: 256 byte tokens, padded to the 300-row embedding as convert_hf_to_gguf does
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(kinds) == 300
    assert tokens[299] == "[PAD299]" and kinds[299] == gguf.TokenType.UNUSED and kinds[0] == gguf.TokenType.NORMAL
    assert any("merges" in note for note in plan.notes)  # the tiny tokenizer has none: llama.cpp would refuse it


def test_data_round_trips_through_the_reader(tiny, tmp_path):
    """Every tensor reads back as gguf-py's own quantize/dequantize of the input (Q/K permuted and un-permuted)."""
    source = open_checkpoint(tiny)
    write(source, tmp_path / "m.gguf", "Q5_1")
    written = open_checkpoint(tmp_path / "m.gguf")
    assert sorted(written.names()) == sorted(source.names())
    for name in source.names():
        qtype = gguf.GGMLQuantizationType[written.stored_dtype(name)]
        original = source.load(name).numpy()
        stored = original
        heads = {"self_attn.q_proj.weight": 4, "self_attn.k_proj.weight": 2}.get(name.split(".", 3)[-1])
        if heads:
            stored = permute_qk(torch.from_numpy(original), heads).numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
        if heads:
            expected = unpermute_qk(torch.from_numpy(np.array(expected)), heads).numpy()
        np.testing.assert_array_equal(written.load(name).numpy(), expected, err_msg=name)


def test_f32_file_gives_transformers_the_same_logits(tiny, tmp_path):
    """transformers reads GGUF with llama.cpp's conventions (names, Q/K permutation, config keys)."""
    import transformers

    write(open_checkpoint(tiny), tmp_path / "m.gguf", "F32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 120, 7, 250, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_keep_super_raises_the_holding_tensor_and_records_it(tiny, tmp_path):
    checkpoint = open_checkpoint(tiny)
    layer, row, col = SUPER
    weights = [Held(f"model.layers.{layer}.mlp.down_proj.weight", row, col)]
    for super_type, expected in (("Q8_0", "Q8_0"), ("F16", "F16")):
        _, reader = write(checkpoint, tmp_path / f"{super_type}.gguf", "Q4_0", super_weights=weights, keep_super=True, super_type=super_type)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types[f"blk.{layer}.ffn_down.weight"] == expected
        assert types["blk.0.ffn_down.weight"] == "Q4_0"
        meta = fields(reader)
        assert meta["swtool.super_weights.tensor"] == [f"blk.{layer}.ffn_down.weight"]
        assert meta["swtool.super_weights.row"] == [row] and meta["swtool.super_weights.col"] == [col]
        assert meta["swtool.super_weights.value"] == [SUPER_VALUE]
        assert meta["swtool.super_weights.type"] == super_type
        value = open_checkpoint(tmp_path / f"{super_type}.gguf").load(weights[0].tensor)[row, col]
        assert abs(float(value) - SUPER_VALUE) < 0.01  # the weight is in the tensor, nearly exact
    _, plain = write(checkpoint, tmp_path / "plain.gguf", "Q4_0", super_weights=weights)
    assert {t.name: t.tensor_type.name for t in plain.tensors}[f"blk.{layer}.ffn_down.weight"] == "Q4_0"
    assert not any(k.startswith("swtool.super_weights") for k in fields(plain))


def test_super_weight_in_a_permuted_tensor_is_recorded_where_it_is_stored(tiny, tmp_path):
    checkpoint = open_checkpoint(tiny)
    name, row, col = "model.layers.2.self_attn.q_proj.weight", 3, 9
    _, reader = write(checkpoint, tmp_path / "q.gguf", "Q4_0", super_weights=[Held(name, row, col)], keep_super=True, super_type="F16")
    meta = fields(reader)
    stored_row = meta["swtool.super_weights.row"][0]
    assert stored_row != row  # the permutation moves rows of Q
    info = next(t for t in reader.tensors if t.name == "blk.2.attn_q.weight")
    raw = gguf.quants.dequantize(np.asarray(info.data), info.tensor_type)
    expected = float(checkpoint.load(name)[row, col].half())
    assert raw[stored_row, col] == pytest.approx(expected) == meta["swtool.super_weights.value"][0]


def test_provenance_is_recorded_and_output_is_deterministic(tiny, tmp_path):
    checkpoint = open_checkpoint(tiny)
    from swtool.provenance import Provenance

    for name in ("a.gguf", "b.gguf"):
        with Provenance("quantize", {"type": "Q8_0"}, [tiny]) as provenance:
            write(checkpoint, tmp_path / name, "Q8_0", provenance=provenance.fields)
            provenance.seal(tmp_path / name)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    meta = fields(gguf.GGUFReader(tmp_path / "b.gguf"))
    assert meta["swtool.version"] == "0.1.0" and json.loads(meta["swtool.options"]) == {"type": "Q8_0"}
    recorded = json.loads(meta["swtool.inputs"])
    assert meta["swtool.command"] == "quantize" and recorded[f"{tiny.name}/model.safetensors"] == provenance.digests()[f"{tiny.name}/model.safetensors"]
    assert (tmp_path / "a.gguf").stat().st_mode & 0o044  # an ordinary file, not mkstemp's 0600


def test_rows_not_filling_blocks_fall_back_to_f16(tmp_path):
    build("llama", tmp_path / "odd", intermediate_size=100)
    checkpoint = open_checkpoint(tmp_path / "odd")
    plan, reader = write(checkpoint, tmp_path / "odd.gguf", "Q4_1")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_1"
    notes = [n for n in plan.notes if "F16" in n]
    assert len(notes) == 4 and "blk.0.ffn_down.weight: row length 100" in notes[0]


def test_gguf_input_keeps_its_names_and_tokenizer(tiny, tmp_path):
    write(open_checkpoint(tiny), tmp_path / "f32.gguf", "F32")
    source = open_checkpoint(tmp_path / "f32.gguf")
    _, reader = write(source, tmp_path / "q8.gguf", "Q8_0")
    before, after = fields(source.reader), fields(reader)
    for key in [k for k in before if k.startswith(("tokenizer.", "llama."))]:
        assert after[key] == before[key], key
    assert after["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert [t.name for t in reader.tensors] == [t.name for t in source.reader.tensors]


def test_bad_type_and_unknown_architecture_are_refused(tiny, tmp_path, monkeypatch):
    import swtool.formats.gguf.writer as gguf_out

    checkpoint = open_checkpoint(tiny)
    with pytest.raises(SwtoolError, match="--type 'IQ2_XS' is not a GGUF type or mix swtool writes; choose one of Q2_K, .*Q4_K_M"):
        plan_gguf(checkpoint, "IQ2_XS")
    with pytest.raises(SwtoolError, match="--super-type 'Q4_0'"):
        plan_gguf(checkpoint, "Q4_0", keep_super=True, super_type="Q4_0")
    family = gguf_out.family_for("llama")
    monkeypatch.setattr(gguf_out, "family_for", lambda *_: dataclasses.replace(family, gguf_arch=None))
    with pytest.raises(SwtoolError, match="llama.cpp has no architecture"):
        plan_gguf(checkpoint, "Q8_0")


def test_failure_mid_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    checkpoint = open_checkpoint(tiny)
    plan = plan_gguf(checkpoint, "Q8_0")
    real_load = checkpoint.load

    def poisoned(name, *args, **kwargs):
        out = real_load(name, *args, **kwargs)
        return out.fill_(float("nan")) if name.endswith("layers.2.mlp.up_proj.weight") else out

    monkeypatch.setattr(checkpoint, "load", poisoned)
    with pytest.raises(SwtoolError, match="NaN or infinite"):
        save_gguf(checkpoint, plan, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_models_llama_cpp_cannot_express_are_refused(tmp_path):
    build("gemma2", tmp_path / "scalar")  # the tiny default query_pre_attn_scalar (24) is not head_dim (16)
    with pytest.raises(SwtoolError, match="query_pre_attn_scalar 24: GGUF has no key for it"):
        plan_gguf(open_checkpoint(tmp_path / "scalar"), "Q8_0")
    build("gemma2", tmp_path / "uncapped", query_pre_attn_scalar=16, attn_logit_softcapping=None)
    with pytest.raises(SwtoolError, match="llama.cpp's gemma2 always soft-caps"):
        plan_gguf(open_checkpoint(tmp_path / "uncapped"), "Q8_0")
    build("gemma", tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(SwtoolError, match="untied lm_head"):
        plan_gguf(open_checkpoint(tmp_path / "untied"), "Q8_0")
    build("llama", tmp_path / "dynamic", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(SwtoolError, match="rope scaling 'dynamic'"):
        plan_gguf(open_checkpoint(tmp_path / "dynamic"), "Q8_0")
    build("qwen2", tmp_path / "window", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(SwtoolError, match="llama.cpp's qwen2 architecture runs none"):
        plan_gguf(open_checkpoint(tmp_path / "window"), "Q8_0")


@pytest.mark.slow
def test_tokenizer_rebuilt_from_smollm2_tokenizer_json_equals_the_original(smollm2_gguf, smollm2_hf):
    """GGUF -> HF directory (swtool's export) -> GGUF keys: tokens, types, merges, pre-tokenizer,
    special ids, add-bos and chat template all come back (add_space_prefix is SentencePiece-only)."""
    from swtool.formats.gguf.metadata import model_metadata

    original = fields(gguf.GGUFReader(smollm2_gguf))
    rebuilt, notes = model_metadata(open_checkpoint(smollm2_hf), "llama")
    assert notes == []
    for key in [k for k in original if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]:
        assert rebuilt[key].value == original[key], key
    assert rebuilt["tokenizer.ggml.pre"].value == "smollm" and len(rebuilt["tokenizer.ggml.merges"].value) == 48900


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """HF llama3 RoPE scaling becomes llama.cpp's rope_freqs tensor; swtool's forward reads the GGUF like the HF directory."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    build("llama", tmp_path / "hf", rope_parameters=rope, rope_scaling=rope)
    source = open_checkpoint(tmp_path / "hf")
    assert source.config.rope_scaling["rope_type"] == "llama3"
    _, reader = write(source, tmp_path / "m.gguf", "F32")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(freqs.data)
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0
    tokens = torch.tensor([[1, 50, 120, 7, 250, 33, 90, 14, 200, 3] * 5])
    torch.testing.assert_close(logits(open_checkpoint(tmp_path / "m.gguf"), tokens), logits(source, tokens), rtol=1e-4, atol=1e-4)
