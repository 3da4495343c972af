"""swtool edit on GGUF files: the edited weights and the GGML blocks holding them change, nothing else does."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from swtool.ablation import EditPlan, edit_tensor
from swtool.codecs.ggml import QType, encode
from swtool.codecs.ggml_edit import encode_through_zero, set_values
from swtool.codecs.kquants import decode
from swtool.families import linear_layers
from swtool.formats.base import Held
from swtool.formats.gguf.rewrite import Replacement, copy_gguf
from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.open import open_checkpoint
from tests.helpers import llamacpp
from tests.helpers.clirun import SLOW_COMMAND, assert_user_error, invoke, snapshot

SUPER = (1, 5, 17)
DOWN = f"model.layers.{SUPER[0]}.mlp.down_proj.weight"
GGUF_DOWN = f"blk.{SUPER[0]}.ffn_down.weight"
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def tiny_gguf(directory, family: str = "llama", **overrides):
    """A tiny random model with a planted super weight (value 30), converted to an F32 GGUF as llama.cpp does."""
    from tests.helpers import tiny
    from tests.helpers.gguf_tiny import convert

    hf = directory / "hf"
    model = tiny.build(family, hf, **overrides)
    if family == "llama":
        tiny.plant(model, hf, [SUPER])
    out = directory / "model-F32.gguf"
    convert(hf, out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny llama (Q/K permuted in the file) as a GGUF of every type swtool encodes, and scan-style JSON."""
    directory = tmp_path_factory.mktemp("edit-gguf")
    f32 = tiny_gguf(directory)
    checkpoint = open_checkpoint(f32)
    files = {"F32": f32}
    for name in TYPES[1:]:
        files[name] = directory / f"model-{name}.gguf"
        save_gguf(checkpoint, plan_gguf(checkpoint, name), files[name])
    scan = directory / "scan.json"
    scan.write_text(json.dumps({"super_weights": [{"layer": SUPER[0], "tensor": GGUF_DOWN, "row": SUPER[1], "col": SUPER[2]}]}))
    return files, scan


def raw_fields(reader: gguf.GGUFReader) -> dict[str, bytes]:
    return {k: b"".join(p.tobytes() for p in f.parts) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensor_bytes(reader: gguf.GGUFReader) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in reader.tensors}


def block_bytes(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    return np.asarray(tensor.data).view(np.uint8).reshape(-1, size)


def assert_copied_except(source, out, edited: set[str]) -> tuple[dict, dict]:
    """Every key/value of `source` byte for byte (its swtool.* keys replaced by edit's provenance), every tensor
    but `edited` byte for byte, in the same order; returns the output's new swtool.* keys and tensors."""
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(out)
    fields_before, fields_after = raw_fields(before), raw_fields(after)
    kept = {k: v for k, v in fields_before.items() if not k.startswith("swtool.")}
    assert {k: fields_after[k] for k in kept} == kept
    added = {k: after.fields[k].contents() for k in fields_after if k not in kept}
    assert set(added) == {"swtool.version", "swtool.command", "swtool.options", "swtool.inputs"}
    assert added["swtool.command"] == "edit"
    assert json.loads(added["swtool.inputs"]) == {Path(source).name: hashlib.sha256(Path(source).read_bytes()).hexdigest()}
    tensors_before, tensors_after = tensor_bytes(before), tensor_bytes(after)
    assert list(tensors_after) == list(tensors_before)
    for name in tensors_before:
        if name not in edited:
            assert tensors_after[name] == tensors_before[name], name
    return added, tensors_after


@pytest.mark.parametrize("type_name", TYPES)
def test_zero_super_rewrites_only_the_block_holding_it(sources, tmp_path, type_name):
    files, scan = sources
    source, out = files[type_name], tmp_path / "zeroed.gguf"
    result = invoke("edit", source, "-o", out, "--zero-super", "--super", scan)
    assert result.exit_code == 0, result.output
    assert "1 GGML block in 1 tensor re-encoded" in " ".join(result.stderr.split())
    added, _ = assert_copied_except(source, out, {GGUF_DOWN})
    assert json.loads(added["swtool.options"])["super_weights"] == [[DOWN, SUPER[1], SUPER[2]]]
    assert list(json.loads(added["swtool.inputs"])) == [source.name]

    layer, row, col = SUPER
    before, after = open_checkpoint(source).load(DOWN), open_checkpoint(out).load(DOWN)
    assert before[row, col] > 20 and after[row, col] == 0.0  # exactly zero, whatever the type
    block = gguf.GGML_QUANT_SIZES[QType[type_name]][0]
    changed_blocks = np.flatnonzero((block_bytes(gguf.GGUFReader(source), GGUF_DOWN) != block_bytes(gguf.GGUFReader(out), GGUF_DOWN)).any(axis=1))
    assert changed_blocks.tolist() == [(row * before.shape[1] + col) // block]
    outside = torch.ones_like(before, dtype=torch.bool)
    outside.view(-1)[changed_blocks[0] * block : (changed_blocks[0] + 1) * block] = False
    assert torch.equal(after[outside], before[outside])


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_scale_super_lands_on_the_nearest_level(sources, tmp_path, type_name):
    files, scan = sources
    out = tmp_path / "scaled.gguf"
    assert invoke("edit", files[type_name], "-o", out, "--scale-super", "2", "--super", scan, "-q").exit_code == 0
    _, row, col = SUPER
    before, after = open_checkpoint(files[type_name]).load(DOWN), open_checkpoint(out).load(DOWN)
    assert float(after[row, col]) == pytest.approx(2 * float(before[row, col]), rel=0.01)


@pytest.mark.parametrize("type_name", ["F32", "Q8_0", "Q4_1"])
def test_zero_outliers_in_permuted_q_and_k_hit_the_right_weights(sources, tmp_path, type_name):
    """Q/K rows are permuted in the file: the pruned positions must be the HF-layout ones, in every linear tensor."""
    files, scan = sources
    out = tmp_path / "pruned.gguf"
    result = invoke("edit", files[type_name], "-o", out, "--zero-outliers", "3", "--super", scan, "-q")
    assert result.exit_code == 0, result.output
    source, edited = open_checkpoint(files[type_name]), open_checkpoint(out)
    plan = EditPlan((Held(DOWN, *SUPER[1:]),), zero_outliers=3)
    names = linear_layers(source.config)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= set(names)
    for name in names:
        expected = edit_tensor(plan, name, source.load(name), is_linear=True)
        got = edited.load(name)
        if type_name == "F32":
            assert torch.equal(got, expected), name
        else:  # the pruned weights are exactly zero; their block-mates re-rounded at most half a step
            pruned = (expected == 0) & (source.load(name) != 0)
            assert int(pruned.sum()) == 3 and (got[pruned] == 0).all(), name
    assert edited.load(DOWN)[SUPER[1], SUPER[2]] == source.load(DOWN)[SUPER[1], SUPER[2]]  # the super weight is spared


def test_routed_experts_are_edited_in_their_slice(tmp_path):
    source = tiny_gguf(tmp_path, "mixtral")
    checkpoint = open_checkpoint(source)
    scan = tmp_path / "none.json"
    scan.write_text(json.dumps({"super_weights": []}))
    out = tmp_path / "pruned.gguf"
    result = invoke("edit", source, "-o", out, "--zero-outliers", "2", "--super", scan, "-q")
    assert result.exit_code == 0, result.output
    edited = open_checkpoint(out)
    experts = [n for n in linear_layers(checkpoint.config) if ".experts." in n]
    assert experts and checkpoint.expert_of(experts[-1]) is not None
    for name in linear_layers(checkpoint.config):
        assert torch.equal(edited.load(name), edit_tensor(EditPlan(zero_outliers=2), name, checkpoint.load(name), True)), name


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensor_keeps_its_type_and_only_the_super_block_changes(tmp_path, type_name):
    """A K-quant tensor holding an edit is patched in place: one 256-value super-block re-encoded at its own type
    (llama.cpp's reference quantizer), every other byte copied; no Q8_0 fallback, no note about one."""
    qtype = QType[type_name]
    f32 = tiny_gguf(tmp_path, intermediate_size=256)  # K-quant blocks hold 256 values: ffn_down rows of 256
    reader = gguf.GGUFReader(f32)
    values = open_checkpoint(f32).load(DOWN)
    source = tmp_path / f"model-{type_name}.gguf"
    copy_gguf(reader, f32, source, {GGUF_DOWN: Replacement(qtype, lambda: encode(values, qtype).reshape(-1))}, lambda key: False, {})
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"super_weights": [{"tensor": GGUF_DOWN, "row": SUPER[1], "col": SUPER[2]}]}))
    out = tmp_path / "zeroed.gguf"
    result = invoke("edit", source, "-o", out, "--zero-super", "--super", scan)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "1 GGML block in 1 tensor re-encoded" in said and "Q8_0" not in said
    _, tensors = assert_copied_except(source, out, {GGUF_DOWN})
    assert tensors[GGUF_DOWN][0] == type_name
    _, row, col = SUPER
    changed = np.flatnonzero((block_bytes(gguf.GGUFReader(source), GGUF_DOWN) != block_bytes(gguf.GGUFReader(out), GGUF_DOWN)).any(axis=1))
    assert changed.tolist() == [(row * 256 + col) // 256]
    before, after = open_checkpoint(source).load(DOWN), open_checkpoint(out).load(DOWN)
    assert before[row, col] > 20 and torch.equal(torch.cat([after[:row], after[row + 1 :]]), torch.cat([before[:row], before[row + 1 :]]))
    expected = before[row].clone()
    expected[col] = 0
    assert torch.equal(after[row], torch.from_numpy(decode(encode(expected, qtype), qtype, (1, 256))).reshape(-1))  # the block, re-encoded
    if type_name in ("Q3_K", "Q6_K"):  # symmetric: 0 is on every grid
        assert after[row, col] == 0
    else:
        assert abs(float(after[row, col])) <= float(expected.abs().max()) / 8


def test_output_must_be_in_the_input_format_and_nothing_is_written(sources, tmp_path):
    files, scan = sources
    hf = files["F32"].parent / "hf"
    state = snapshot(tmp_path)
    for model, out, match in [
        (files["Q4_1"], tmp_path / "edited", r"MODEL is a GGUF file .* name the output \*\.gguf"),
        (files["Q4_1"], tmp_path / "edited.safetensors", r"MODEL is a GGUF file"),
        (hf, tmp_path / "edited.gguf", r"MODEL is a Hugging Face directory .* not \.gguf"),
    ]:
        assert_user_error(invoke("edit", model, "-o", out, "--zero-super", "--super", scan), match)
    assert snapshot(tmp_path) == state
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"mine")
    state = snapshot(tmp_path)
    assert_user_error(invoke("edit", files["Q4_1"], "-o", existing, "--zero-super"), "already exists")  # refused before scanning
    assert snapshot(tmp_path) == state


def test_deterministic_and_the_inputs_swtool_keys_are_replaced(sources, tmp_path):
    """A swtool quantize --keep-super GGUF records its super weights' values; once edited they would lie: replaced."""
    files, scan = sources
    checkpoint = open_checkpoint(files["F32"])
    held = [Held(DOWN, *SUPER[1:])]
    source = tmp_path / "kept.gguf"
    save_gguf(checkpoint, plan_gguf(checkpoint, "Q4_0", super_weights=held, keep_super=True, provenance={"swtool.command": "quantize"}), source)
    assert "swtool.super_weights.value" in gguf.GGUFReader(source).fields
    outs = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for out in outs:
        assert invoke("edit", source, "-o", out, "--zero-super", "--super", scan, "-q").exit_code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    fields = gguf.GGUFReader(outs[0]).fields
    assert not any(k.startswith("swtool.super_weights") for k in fields)
    assert fields["swtool.command"].contents() == "edit"


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q5_1])
def test_affine_blocks_get_a_grid_through_zero(qtype):
    """Q4_1/Q5_1 store 0 exactly only when the block's grid passes through it: such blocks get one, at RTN's error bound."""
    generator = np.random.default_rng(1)
    blocks = (generator.standard_normal((200, 32)) * generator.choice([1e-4, 0.05, 3.0, 200.0], size=(200, 1))).astype(np.float32)
    blocks[:, 0] = 0.0
    blocks[:3] = [0.0] * 32  # an all-zero block
    blocks[3, 1:] = 7.5  # zero is the minimum
    decoded = gguf.quants.dequantize(encode_through_zero(blocks, qtype), qtype)
    assert (decoded[:, 0] == 0).all() and (decoded[:3] == 0).all()
    top = 15 if qtype == QType.Q4_1 else 31
    step = (blocks.max(axis=1) - blocks.min(axis=1)) / top
    assert (np.abs(decoded - blocks) <= step[:, None] * (1 + 1 / 16) / 2 + 1e-6).all()
    plain = gguf.quants.dequantize(gguf.quants.quantize(blocks, qtype), qtype)
    assert (plain[:, 0] != 0).sum() > 100  # without it, zero is usually off the grid


def test_set_values_touches_only_the_blocks_it_must():
    values = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    raw = gguf.quants.quantize(values, QType.Q4_0).reshape(-1)
    out = set_values(raw, QType.Q4_0, np.array([3, 200]), np.array([0.0, 1.5], dtype=np.float32))
    changed = np.flatnonzero((out.reshape(-1, 18) != raw.reshape(-1, 18)).any(axis=1))
    assert changed.tolist() == [0, 6]
    decoded = gguf.quants.dequantize(out.reshape(4, -1), QType.Q4_0).reshape(-1)
    assert decoded[3] == 0 and decoded[200] == pytest.approx(1.5, abs=0.25)


@pytest.fixture(scope="module")
def smollm2_zeroed(smollm2_gguf, tmp_path_factory):
    scan = tmp_path_factory.mktemp("sw") / "scan.json"
    scan.write_text(json.dumps({"super_weights": [{"layer": 11, "tensor": "blk.11.ffn_down.weight", "row": 507, "col": 1229}]}))
    out = tmp_path_factory.mktemp("smollm2-edit") / "zeroed.gguf"
    result = invoke("edit", smollm2_gguf, "-o", out, "--zero-super", "--super", scan)
    assert result.exit_code == 0, result.output
    return out


def test_smollm2_zero_super_reads_back_zero_and_the_rest_is_the_input(smollm2_gguf, smollm2_zeroed):
    """The file is the input but for one 20-byte Q4_1 block and four swtool.* keys: compared as raw bytes
    (the data sections end-aligned, being the same size), then the zero read back through swtool's reader."""
    source, out = smollm2_gguf.read_bytes(), smollm2_zeroed.read_bytes()
    checkpoint = open_checkpoint(smollm2_zeroed)
    tensor = next(t for t in checkpoint.reader.tensors if t.name == "blk.11.ffn_down.weight")
    assert tensor.tensor_type == QType.Q4_1
    size = gguf.GGML_QUANT_SIZES[QType.Q4_1][1]
    start = tensor.data_offset + (507 * 1536 + 1229) // 32 * size
    tail = len(out) - start  # the data from that block on, at the same distance from the end in both files
    assert out[start + size :] == source[len(source) - tail + size :]
    assert out[start : start + size] != source[len(source) - tail : len(source) - tail + size]
    data_start = checkpoint.reader.data_offset
    assert out[data_start:start] == source[len(source) - (len(out) - data_start) : len(source) - tail]
    copied = [f for k, f in checkpoint.reader.fields.items() if not k.startswith(("GGUF.", "swtool."))]
    assert len(copied) == int.from_bytes(source[16:24], "little")  # every key/value of the input...
    end = copied[-1].offset + sum(p.nbytes for p in copied[-1].parts)
    assert out[24:end] == source[24:end]  # ...byte for byte, tokenizer included
    assert checkpoint.meta["swtool.command"] == "edit"
    row = checkpoint.load("model.layers.11.mlp.down_proj.weight", rows=[507])[0]
    assert row[1229] == 0.0


def test_smollm2_zeroed_gguf_perplexity_explodes(smollm2_zeroed, wiki_text, tmp_path):
    """Same windows, swtool's own forward: the input file 18.2, this edited file 138.0 (measured once with
    `swtool eval FILE --text T --ctx 128 --max-windows 2`); so anything above 60 is the super weight gone."""
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text[:4000])
    result = invoke("eval", smollm2_zeroed, "--text", text, "--ctx", "128", "--max-windows", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ppl"] > 60


@pytest.mark.llamacpp
@pytest.mark.skipif(llamacpp.configured() is None, reason=llamacpp.SKIP_REASON)
def test_llama_cpp_runs_the_edited_file(smollm2_zeroed, wiki_text, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text[:60_000])
    assert llamacpp.final_perplexity(smollm2_zeroed, text) > 60  # the original file scores about 16.6 here


def test_full_disk_mid_write_leaves_nothing(sources, tmp_path, monkeypatch):
    import errno

    import swtool.formats.gguf.rewrite as gguf_copy

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf_copy, "_copy_range", full)
    files, scan = sources
    out = tmp_path / "out.gguf"
    assert_user_error(invoke("edit", files["Q4_0"], "-o", out, "--zero-super", "--super", scan), f"{out}: no space left on device while writing")
    assert os.listdir(tmp_path) == []


def test_sigterm_mid_write_leaves_no_output(sources, tmp_path):
    import signal
    import subprocess

    files, scan = sources
    out = tmp_path / "out.gguf"
    writer = subprocess.Popen([*SLOW_COMMAND, "edit", files["Q4_1"], "-o", out, "--zero-super", "--super", scan], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing", writer.communicate()
    assert any(".swtool-tmp-" in n for n in os.listdir(tmp_path))  # half written
    writer.send_signal(signal.SIGTERM)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 128 + signal.SIGTERM
    assert stderr.strip() == f"swtool: error: interrupted by SIGTERM; {out} was not written"
    assert os.listdir(tmp_path) == []
