"""`swtool quantize --type MIX` through the CLI: the mix's types, llama.cpp's bytes per tensor, super weight promotion."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from tests.helpers.clirun import invoke
from gguf import GGMLQuantizationType as T

from swtool.codecs.ggml import encode
from swtool.formats.base import Held
from swtool.formats.gguf.mixes import MIXES
from swtool.formats.gguf.reader import permute_qk, qk_heads
from swtool.formats.gguf.writer import plan_gguf
from swtool.formats.open import open_checkpoint

LAYERS = 4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny llama whose rows K-quants take (256), except the head's vocabulary axis; untied head."""
    from tests.helpers.tiny import build

    directory = tmp_path_factory.mktemp("kq") / "hf"
    build("llama", directory, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, tie_word_embeddings=False)
    return directory


def quantize(hf, out, *args):
    result = invoke("quantize", hf, "-o", out, *args)
    assert result.exit_code == 0, result.output
    return result, gguf.GGUFReader(out)


def test_mix_alias_writes_the_mix_with_llama_cpp_bytes(hf, tmp_path):
    """--type Q4_K is llama-quantize's alias of Q4_K_M; every tensor holds the codecs' bytes of the source (golden-tested
    against llama.cpp), at the type the mix's rules give."""
    _, reader = quantize(hf, tmp_path / "m.gguf", "--type", "q4_k", "--no-keep-super", "-q")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.file_type"] == int(MIXES["Q4_K_M"].file_type)
    assert json.loads(fields["swtool.options"])["type"] == "Q4_K_M"
    checkpoint = open_checkpoint(hf)
    planned = {t.name: t for t in plan_gguf(checkpoint, "Q4_K_M").tensors}
    seen = set()
    for tensor in reader.tensors:
        plan = planned[tensor.name]
        assert tensor.tensor_type == plan.qtype, tensor.name
        seen.add(tensor.tensor_type)
        if tensor.tensor_type == T.F32:
            continue
        weight = checkpoint.load(plan.source)
        heads = qk_heads(checkpoint.family, checkpoint.config, plan.source)
        expected = encode(permute_qk(weight, heads) if heads else weight, tensor.tensor_type)
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), expected.reshape(-1)), tensor.name
    assert {T.Q4_K, T.Q6_K} <= seen


@pytest.mark.parametrize("super_type, expected", [("Q6_K", T.Q6_K), ("Q8_0", T.Q8_0), ("F16", T.F16)])
def test_keep_super_promotes_the_holding_tensor(hf, tmp_path, super_type, expected):
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"super_weights": [{"layer": 1, "tensor": "model.layers.1.mlp.down_proj.weight", "row": 3, "col": 7}]}))
    result, reader = quantize(hf, tmp_path / "m.gguf", "--type", "Q3_K_S", "--super", str(scan), "--super-type", super_type)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == expected and types["blk.2.ffn_down.weight"] == T.Q3_K
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["swtool.super_weights.tensor"] == ["blk.1.ffn_down.weight"] and fields["swtool.super_weights.type"] == super_type
    assert f"written as {expected.name}" in " ".join(result.output.split())


def test_q6_k_super_type_is_not_a_demotion_and_falls_back_on_short_rows(tmp_path):
    """Q6_K never replaces a more precise planned type; on rows it cannot take it becomes Q8_0, with a note."""
    from tests.helpers.tiny import build

    build("llama", tmp_path / "hf", num_hidden_layers=2)  # rows of 64 and 128
    checkpoint = open_checkpoint(tmp_path / "hf")
    held = [Held("model.layers.0.mlp.down_proj.weight", 1, 2)]
    plan = plan_gguf(checkpoint, "Q4_0", super_weights=held, keep_super=True, super_type="Q6_K")
    types = {t.name: t.qtype for t in plan.tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q8_0 and types["blk.1.ffn_down.weight"] == T.Q4_0
    assert any(n.startswith("blk.0.ffn_down.weight: row length 128 is not a multiple of 256 (the Q6_K") for n in plan.notes)
    plan = plan_gguf(checkpoint, "F16", super_weights=held, keep_super=True, super_type="Q6_K")
    assert {t.name: t.qtype for t in plan.tensors}["blk.0.ffn_down.weight"] == T.F16


@pytest.fixture(scope="module")
def importance(hf, tmp_path_factory):
    """An importance matrix of the tiny llama made by swtool imatrix on a short text."""
    folder = tmp_path_factory.mktemp("imatrix")
    (folder / "text.txt").write_text(" ".join(f"word{n % 37} and {n * 7 % 11} more" for n in range(400)))
    result = invoke("imatrix", hf, "--text", folder / "text.txt", "-o", folder / "m.imatrix.gguf", "--ctx", "64", "--chunks", "4", "-q")
    assert result.exit_code == 0, result.output
    return folder / "m.imatrix.gguf"


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q4_0"])
def test_imatrix_weights_every_named_tensor(hf, importance, tmp_path, mix):
    """--imatrix: each tensor the imatrix names holds the weighted codecs' bytes (golden-tested against llama.cpp's
    weighted quantizers), with the imatrix's means as weights; provenance records the file."""
    from swtool.formats.gguf.imatrix import read_imatrix

    _, reader = quantize(hf, tmp_path / "m.gguf", "--type", mix, "--no-keep-super", "-q", "--imatrix", importance)
    means = {name: entry.means() for name, entry in read_imatrix(importance).entries.items()}
    checkpoint = open_checkpoint(hf)
    planned = {t.name: t for t in plan_gguf(checkpoint, mix, importance=means).tensors}
    weighted = 0
    for tensor in reader.tensors:
        plan = planned[tensor.name]
        if tensor.tensor_type in (T.F32, T.F16, T.Q8_0) or tensor.name not in means:
            continue
        weight = checkpoint.load(plan.source)
        heads = qk_heads(checkpoint.family, checkpoint.config, plan.source)
        weight = permute_qk(weight, heads) if heads else weight
        expected = encode(weight, tensor.tensor_type, weights=means[tensor.name][0])
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), expected.reshape(-1)), tensor.name
        assert not np.array_equal(expected, encode(weight, tensor.tensor_type)), f"{tensor.name}: the weights changed nothing"
        weighted += 1
    assert weighted >= 4 * LAYERS
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert json.loads(fields["swtool.options"])["imatrix"] == importance.name
    assert importance.name in json.loads(fields["swtool.inputs"])


def test_imatrix_is_checked_before_any_work(hf, importance, tmp_path):
    from tests.helpers.clirun import assert_user_error

    assert_user_error(invoke("quantize", hf, "-o", tmp_path / "q", "--imatrix", importance), "--imatrix applies to --format gguf only")
    assert_user_error(invoke("quantize", hf, "-o", tmp_path / "q.gguf", "--imatrix", tmp_path / "missing.gguf"), "--imatrix .*: no such file")
    other = tmp_path / "other"
    from tests.helpers.tiny import build

    build("llama", other, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, tie_word_embeddings=False)
    assert_user_error(invoke("quantize", other, "-o", tmp_path / "o.gguf", "--type", "Q4_0", "--no-keep-super", "--imatrix", importance), "an imatrix of another model")
    assert not (tmp_path / "o.gguf").exists()
