"""Damaged and hostile checkpoints: one clear line on stderr, exit 2, no traceback, nothing changed or left behind.

Each case damages exactly one thing in an otherwise valid tiny checkpoint
(tests/helpers/synthetic.py) and runs `swtool scan` on it in-process. Property tests
(hypothesis) then damage files at random: whatever the bytes, opening and
reading a checkpoint either works or raises SwtoolError, never anything else
(60 examples each by default; SWTOOL_FUZZ_EXAMPLES=5000 for a long hunt).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swtool.errors import SwtoolError
from swtool.formats.open import open_checkpoint
from tests.helpers.clirun import assert_user_error, invoke, snapshot, swtool
from tests.helpers.synthetic import CONFIG, gguf_file, llama_dir, llama_tensors, safetensors_bytes

FAST = settings(max_examples=int(os.environ.get("SWTOOL_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    llama_dir(directory)
    return directory


def scan_fails(path: Path, match: str, *extra: str) -> str:
    """`swtool scan path` fails as a user error and leaves every file as it was."""
    before = snapshot(path)
    line = assert_user_error(invoke("scan", path, *extra), match)
    assert snapshot(path) == before
    return line


def rewrite(model: Path, data: bytes) -> None:
    (model / "model.safetensors").write_bytes(data)


def test_the_undamaged_model_scans(model):
    result = invoke("scan", model, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "llama"


# -- safetensors ---------------------------------------------------------------


def test_truncated_file(model):
    data = (model / "model.safetensors").read_bytes()
    rewrite(model, data[:-100])
    scan_fails(model, r"data_offsets end at byte \d+ but the file holds \d+ data bytes \(truncated\?\)")


def test_file_shorter_than_the_header_length(model):
    rewrite(model, b"\x10\x00")
    scan_fails(model, "truncated safetensors file")


def test_header_length_larger_than_the_file(model):
    data = (model / "model.safetensors").read_bytes()
    rewrite(model, struct.pack("<Q", len(data) * 2) + data[8:])
    scan_fails(model, "header length .* runs past the end of the file")


def test_header_over_the_100MB_cap_is_refused_before_reading(model):
    rewrite(model, struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    scan_fails(model, "exceeds the format's 100 MB cap")


@pytest.mark.parametrize("header", [b"not json at all!", b"\xff\xfe\x00\x00garbage", b"[1, 2, 3]", b'{"__metadata__": 5}'])
def test_header_not_a_json_object(model, header):
    rewrite(model, struct.pack("<Q", len(header)) + header)
    scan_fails(model, "header is not valid JSON|not a JSON object")


def damage(model: Path, patch) -> None:
    rewrite(model, safetensors_bytes(llama_tensors(CONFIG), patch))


DOWN = "model.layers.1.mlp.down_proj.weight"


def test_data_offsets_outside_the_data(model):
    def patch(header):
        begin, end = header[DOWN]["data_offsets"]
        header[DOWN]["data_offsets"] = [begin + 10**9, end + 10**9]

    damage(model, patch)
    scan_fails(model, f"{DOWN}: data_offsets end at byte")


def test_overlapping_tensors(model):
    first, second = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"

    def patch(header):
        header[second]["data_offsets"] = list(header[first]["data_offsets"])

    damage(model, patch)
    scan_fails(model, "overlaps the previous tensor's bytes")


def test_trailing_bytes_after_the_last_tensor(model):
    with (model / "model.safetensors").open("ab") as fh:
        fh.write(b"\0" * 24)
    scan_fails(model, "24 trailing bytes after the last tensor")


def test_hole_between_tensors(model):
    def patch(header):
        header.pop("model.layers.0.self_attn.v_proj.weight")

    damage(model, patch)
    scan_fails(model, r"a hole of \d+ bytes precedes tensor")


def test_unknown_dtype(model):
    damage(model, lambda h: h[DOWN].update(dtype="F12"))
    scan_fails(model, f"{DOWN}: unknown dtype 'F12'")


def test_shape_and_byte_size_disagree(model):
    damage(model, lambda h: h[DOWN].update(shape=[16, 33]))
    scan_fails(model, r"shape \[16, 33\] of F32 needs 2112 bytes, data_offsets give 2048")


@pytest.mark.parametrize("offsets", [[5], ["0", "8"], [9, 3], [-4, 0], None])
def test_malformed_data_offsets(model, offsets):
    damage(model, lambda h: h[DOWN].update(data_offsets=offsets))
    scan_fails(model, "bad data_offsets")


def test_absurd_shape_is_a_size_mismatch_not_an_allocation(model):
    damage(model, lambda h: h[DOWN].update(shape=[2**40, 2**40]))
    scan_fails(model, "needs .* bytes, data_offsets give 2048")


# -- sharded directories ---------------------------------------------------------


def shard(model: Path, split: int = 10) -> tuple[list[str], dict[str, str]]:
    """Rewrite the model as two shards and an index; returns the tensor names and the weight map."""
    tensors = llama_tensors(CONFIG)
    names = list(tensors)
    files = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    weight_map = {}
    for file, part in files.items():
        (model / file).write_bytes(safetensors_bytes({n: tensors[n] for n in part}))
        weight_map.update({n: file for n in part})
    (model / "model.safetensors").unlink()
    write_index(model, weight_map)
    return names, weight_map


def write_index(model: Path, weight_map: dict[str, str]) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_model_opens(model):
    shard(model)
    assert len(open_checkpoint(model).files) == 2


def test_index_names_a_missing_shard(model):
    shard(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    scan_fails(model, "names shard model-00002-of-00002.safetensors, which does not exist")


def test_tensor_in_two_shards(model):
    names, weight_map = shard(model)
    tensors = llama_tensors(CONFIG)
    second = [n for n, f in weight_map.items() if f.startswith("model-00002")]
    (model / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes({n: tensors[n] for n in [names[0], *second]}))
    scan_fails(model, f"tensor {names[0]} is stored in two shards")


def test_shard_not_in_the_index(model):
    names, weight_map = shard(model)
    tensors = llama_tensors(CONFIG)
    (model / "model-00003-of-00003.safetensors").write_bytes(safetensors_bytes({"extra.weight": tensors[names[0]]}))
    scan_fails(model, "shard model-00003-of-00003.safetensors is not in model.safetensors.index.json")


def test_index_lists_a_tensor_its_shard_lacks(model):
    names, weight_map = shard(model)
    write_index(model, {**weight_map, "model.layers.0.mlp.extra.weight": "model-00001-of-00002.safetensors"})
    scan_fails(model, "listed in model-00001-of-00002.safetensors but not stored there")


def test_index_not_json(model):
    shard(model)
    (model / "model.safetensors.index.json").write_text("{weight_map: ")
    scan_fails(model, "a safetensors index is not valid JSON")
    write_index(model, {"model.embed_tokens.weight": 7})
    scan_fails(model, "not a valid index")


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "/etc/hostname", ".hidden.safetensors"])
def test_index_naming_a_file_outside_the_directory(model, shard_name):
    names, weight_map = shard(model)
    write_index(model, {**weight_map, names[0]: shard_name})
    scan_fails(model, f"shard name '{shard_name}' is not a file name in the model directory")


def test_header_of_countless_tiny_entries_is_refused_before_parsing(model):
    """Valid JSON within the 100 MB cap, but 1.7 million zero-size tensors would take GBs as Python objects."""
    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = b"{" + b",".join(entry % i for i in range(200_000)) + b"}"
    rewrite(model, struct.pack("<Q", len(header)) + header)
    scan_fails(model, "safetensors header holds more than 1000000 JSON values")


@pytest.mark.parametrize("where", ["model.safetensors", "config.json"])
def test_deeply_nested_json(model, where):
    nested = b"[" * 100_000 + b"]" * 100_000
    if where == "config.json":
        (model / where).write_bytes(nested)
    else:
        rewrite(model, struct.pack("<Q", len(nested)) + nested)
    scan_fails(model, "is not valid JSON \\(RecursionError\\)")


def test_oversized_config(model):
    (model / "config.json").write_bytes(b" " * (16 * 1024 * 1024 + 1))
    scan_fails(model, "too large for config.json")


# -- GGUF ------------------------------------------------------------------------


@pytest.fixture
def gguf_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    gguf_file(path)
    return path


def test_the_undamaged_gguf_opens(gguf_path):
    checkpoint = open_checkpoint(gguf_path)
    assert checkpoint.shape("model.layers.1.mlp.down_proj.weight") == (16, 32)
    assert len(checkpoint.meta["tokenizer.ggml.tokens"]) == 300


def patch_bytes(path: Path, after: bytes, fmt: str, value: int, skip: int = 0) -> None:
    """Overwrite the `fmt` field found `skip` bytes after the (unique) byte string `after`."""
    data = bytearray(path.read_bytes())
    assert data.count(after) == 1
    at = data.index(after) + len(after) + skip
    struct.pack_into("<" + fmt, data, at, value)
    path.write_bytes(bytes(data))


def test_gguf_bad_magic(gguf_path):
    data = gguf_path.read_bytes()
    gguf_path.write_bytes(b"GGML" + data[4:])
    scan_fails(gguf_path, r"not a GGUF file \(bad magic b'GGML'\)")


@pytest.mark.parametrize("version", [1, 4, 99])
def test_gguf_unsupported_version(gguf_path, version):
    patch_bytes(gguf_path, b"GGUF", "I", version)
    scan_fails(gguf_path, f"GGUF version {version} is not supported")


def test_gguf_truncated_tensor_data(gguf_path):
    data = gguf_path.read_bytes()
    gguf_path.write_bytes(data[:-64])
    scan_fails(gguf_path, r"tensor output.weight needs data up to byte \d+ but the file holds \d+ data bytes \(truncated\?\)")


def test_gguf_unknown_tensor_type(gguf_path):
    # tensor info: name, n_dims u32, 2 dims u64, type u32
    patch_bytes(gguf_path, b"blk.1.ffn_down.weight", "I", 77, skip=4 + 16)
    scan_fails(gguf_path, "tensor blk.1.ffn_down.weight has unknown tensor type 77")


def test_gguf_tensor_past_the_end(gguf_path):
    patch_bytes(gguf_path, b"blk.1.ffn_down.weight", "Q", 2**40, skip=4 + 16 + 4)
    scan_fails(gguf_path, "blk.1.ffn_down.weight needs data up to byte")


def test_gguf_metadata_array_with_an_absurd_length(gguf_path):
    # key/value: key, value type u32 (ARRAY), item type u32, count u64
    patch_bytes(gguf_path, b"tokenizer.ggml.tokens", "Q", 2**62, skip=8)
    scan_fails(gguf_path, r"key tokenizer.ggml.tokens: array claims 4611686018427387904 items")


def field_at(path: Path, after: bytes, fmt: str, skip: int = 0) -> int:
    data = path.read_bytes()
    return struct.unpack_from("<" + fmt, data, data.index(after) + len(after) + skip)[0]


def test_gguf_misaligned_tensor(gguf_path):
    offset = field_at(gguf_path, b"blk.1.ffn_down.weight", "Q", skip=4 + 16 + 4)
    patch_bytes(gguf_path, b"blk.1.ffn_down.weight", "Q", offset + 4, skip=4 + 16 + 4)
    scan_fails(gguf_path, r"tensor blk.1.ffn_down.weight starts at offset \d+, not a multiple of the alignment 32")


def test_gguf_overlapping_tensors(gguf_path):
    offset = field_at(gguf_path, b"blk.1.ffn_up.weight", "Q", skip=4 + 16 + 4)
    patch_bytes(gguf_path, b"blk.1.ffn_down.weight", "Q", offset, skip=4 + 16 + 4)
    scan_fails(gguf_path, "tensor blk.1.(ffn_down|ffn_up).weight overlaps the previous tensor's data")


def test_gguf_absurd_counts(gguf_path):
    patch_bytes(gguf_path, b"GGUF", "Q", 2**60, skip=4 + 8)
    scan_fails(gguf_path, "key/values and .* tensors cannot fit")


def test_gguf_absurd_string_length(gguf_path):
    patch_bytes(gguf_path, b"general.architecture", "Q", 2**50, skip=4)
    scan_fails(gguf_path, "string value of general.architecture needs")


def gguf_with_array(path: Path, count: int) -> None:
    """A GGUF holding nothing but one real uint8 metadata array of `count` items."""
    key = b"big"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, count)
    path.write_bytes(header + bytes(count))


def test_gguf_metadata_array_too_many_real_items(tmp_path):
    """Items that really are in the file: gguf-py would make a Python object of each (GBs for a 1 GB file)."""
    gguf_with_array(tmp_path / "big.gguf", (1 << 22) + 1)
    scan_fails(tmp_path / "big.gguf", r"key big: 4194305 array items \(4194305 in all\) exceed swtool's limits")


ABSURD_RSS = textwrap.dedent(
    """
    import resource, sys
    from swtool.formats.open import open_checkpoint
    from swtool.errors import SwtoolError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sys.argv[1:]:
        try:
            open_checkpoint(path)
        except SwtoolError as exc:
            print("refused:", exc, file=sys.stderr)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)

ABSURD_COUNTS = [
    (b"tokenizer.ggml.tokens", "Q", 2**62, 8, "array claims"),  # gguf-py alone loops over it, allocating a view per item
    (b"llama.block_count", "I", 2**32 - 1, 4, "layer count 4294967295 is not an integer between 1 and 10000"),
    (b"llama.block_count", "I", 9999, 4, "the config declares 9999 layers"),  # gguf-py's name map grows with it
]


def test_absurd_gguf_counts_do_not_allocate(tmp_path):
    """Counts in a hostile header are refused (or bounded by what the file holds) at once, in little memory.

    One process opens all the damaged files (peak RSS only grows), so the import cost is paid once."""
    paths = []
    for index, (after, fmt, value, skip, _) in enumerate(ABSURD_COUNTS):
        path = tmp_path / f"m{index}.gguf"
        gguf_file(path)
        patch_bytes(path, after, fmt, value, skip=skip)
        paths.append(str(path))
    done = subprocess.run([sys.executable, "-c", ABSURD_RSS, *paths], capture_output=True, text=True, timeout=300)
    refusals = done.stderr.splitlines()
    assert len(refusals) == len(ABSURD_COUNTS), done.stderr
    for line, (*_, match) in zip(refusals, ABSURD_COUNTS):
        assert line.startswith("refused:") and match in line, line
    assert int(done.stdout) < 32, f"peak RSS grew by {done.stdout.strip()} MiB while refusing the files"


# -- config ----------------------------------------------------------------------


def set_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_config_missing_key(model, key):
    set_config(model, **{key: None})
    scan_fails(model, f"config.json: missing key '{key}'")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": "16"}, "hidden_size must be a positive integer, got '16'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "config.json: malformed value"),
        ({"rope_scaling": [1, 2]}, "config.json: malformed value"),
        ({"model_type": "gpt_neox"}, "unsupported model_type 'gpt_neox'"),
        ({"num_hidden_layers": 10**12}, "layer count 1000000000000 is not an integer between 1 and 10000"),
        ({"num_local_experts": 10**9, "num_experts_per_tok": 2}, "1000000000 experts is not between 0 and 4096"),
    ],
)
def test_config_malformed_value(model, changes, match):
    set_config(model, **changes)
    scan_fails(model, match)


def test_config_not_json(model):
    (model / "config.json").write_text("{'model_type': 'llama'")
    scan_fails(model, "config.json is not valid JSON")


def test_config_declares_more_layers_than_the_weights_hold(model):
    set_config(model, num_hidden_layers=3)
    scan_fails(model, r"tensor model.layers.2.input_layernorm.weight \(layer 2; the config declares 3 layers\) is missing")


def test_config_declares_fewer_layers_than_the_weights_hold(model):
    set_config(model, num_hidden_layers=1)
    scan_fails(model, "tensor model.layers.1.input_layernorm.weight belongs to layer 1, but the config declares 1 layers")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"intermediate_size": 48}, r"model.layers.0.mlp.gate_proj.weight has shape \[32, 16\], the config implies \[48, 16\]"),
        ({"vocab_size": 301}, r"model.embed_tokens.weight has shape \[300, 16\], the config implies \[301, 16\]"),
        ({"num_key_value_heads": 2}, r"k_proj.weight has shape \[8, 16\], the config implies \[16, 16\]"),
    ],
)
def test_config_widths_disagree_with_the_tensors(model, changes, match):
    set_config(model, **changes)
    scan_fails(model, match)


def test_gguf_metadata_disagreeing_with_tensors(tmp_path):
    """A GGUF whose block_count claims a layer the file lacks."""
    import gguf

    path = tmp_path / "m.gguf"
    tensors = gguf_file(path)
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # after the value type
    struct.pack_into("<I", data, at, 3)
    path.write_bytes(bytes(data))
    assert gguf.GGUFReader(path).fields["llama.block_count"].contents() == 3 and tensors
    scan_fails(path, r"tensor model.layers.2.input_layernorm.weight \(layer 2; the config declares 3 layers\) is missing")


# -- NaN and Inf -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_is_refused_with_its_name_and_place(tmp_path, bad):
    tensors = llama_tensors(CONFIG)
    tensors[DOWN][3, 7] = bad
    tensors[DOWN][5, 1] = bad
    llama_dir(tmp_path / "m", tensors=tensors)
    scan_fails(tmp_path / "m", rf"tensor {DOWN} holds 2 NaN/Inf value\(s\) \(first at \[3, 7\]\).*--allow-nonfinite")


LAYER_WEIGHTS = [f"model.layers.1.{name}.weight" for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", LAYER_WEIGHTS)
def test_every_weight_of_a_layer_loaded_unchecked_is_caught_by_its_output(tmp_path, tensor, bad):
    """Dense layers load without the NaN/Inf pass (swtool.model.stream.check_output): one bad value
    anywhere in any of their weights must still stop the scan and eval, naming it."""
    tensors = llama_tensors(CONFIG)
    place = (1, 2) if tensors[tensor].ndim == 2 else (2,)
    tensors[tensor][place] = bad
    llama_dir(tmp_path / "m", tensors=tensors)
    where = rf"tensor {tensor} holds 1 NaN/Inf value\(s\) \(first at \[{', '.join(map(str, place))}\]\)"
    scan_fails(tmp_path / "m", where)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again, all day long. " * 4)
    assert_user_error(invoke("eval", tmp_path / "m", "--text", text, "--ctx", "16", "--max-windows", "1", "--json"), where)


def test_an_output_overflowing_without_a_bad_weight_makes_later_layers_checked_as_they_load(tmp_path):
    """An fp16 compute dtype can overflow a layer's output with finite weights: from then on the
    loads check, so a bad weight further on is still named (its output is non-finite anyway)."""
    from swtool.model.forward import LayerStream

    tensors = llama_tensors(CONFIG)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    llama_dir(tmp_path / "m", tensors=tensors)
    stream = LayerStream(open_checkpoint(tmp_path / "m"))
    weights = stream.layer_weights(0)
    stream.check_output(0, torch.full((1, 2, 16), float("inf")))  # layer 0's weights are fine: no error
    assert not stream.checks_outputs
    with pytest.raises(SwtoolError, match=r"up_proj.weight holds 1 NaN/Inf value\(s\) \(first at \[3, 4\]\)"):
        stream.layer_weights(1, reuse=weights)


def test_allow_nonfinite_lets_the_scan_run(tmp_path):
    tensors = llama_tensors(CONFIG)
    tensors["model.layers.1.input_layernorm.weight"][2] = np.nan
    llama_dir(tmp_path / "m", tensors=tensors)
    scan_fails(tmp_path / "m", "tensor model.layers.1.input_layernorm.weight holds 1 NaN/Inf")
    result = invoke("scan", tmp_path / "m", "--json", "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "llama"


def test_nonfinite_in_gguf_names_the_stored_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = {k: v for k, v in gguf_file(tmp_path / "clean.gguf").items()}
    tensors["blk.0.ffn_up.weight"][31, 2] = np.nan
    gguf_file(path, tensors=tensors)
    scan_fails(path, r"tensor blk.0.ffn_up.weight holds 1 NaN/Inf value\(s\) \(first at \[31, 2\]\)")


def test_large_finite_fp16_is_not_mistaken_for_inf(tmp_path):
    """The fast check sums the tensor; in fp16 that sum overflows for large weights, which must not be an error."""
    tensors = llama_tensors(CONFIG, dtype="float16")
    tensors[DOWN][:] = 60000.0
    llama_dir(tmp_path / "m", tensors=tensors)
    checkpoint = open_checkpoint(tmp_path / "m")
    assert float(checkpoint.load(DOWN).max()) == 60000.0
    tensors[DOWN][4, 4] = np.inf
    llama_dir(tmp_path / "m", tensors=tensors)
    with pytest.raises(SwtoolError, match=r"holds 1 NaN/Inf value\(s\) \(first at \[4, 4\]\)"):
        open_checkpoint(tmp_path / "m").load(DOWN)


def test_nonfinite_rows_report_their_place_in_the_whole_tensor(tmp_path):
    tensors = llama_tensors(CONFIG)
    tensors["lm_head.weight"][250, 3] = np.nan
    llama_dir(tmp_path / "m", tensors=tensors)
    checkpoint = open_checkpoint(tmp_path / "m")
    checkpoint.load("lm_head.weight", rows=slice(0, 200))
    with pytest.raises(SwtoolError, match=r"first at \[250, 3\]"):
        checkpoint.load("lm_head.weight", rows=slice(200, 300))


# -- PyTorch pickles ---------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that the pickle was (or was not) executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_file_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Payload(marker)))
    line = scan_fails(path, "PyTorch pickle weights; swtool never unpickles them")
    assert "safetensors" in line and "weights_only=True" in line
    assert not marker.exists()


def test_directory_with_only_pickle_weights(tmp_path):
    marker = tmp_path / "pwned"
    llama_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    scan_fails(tmp_path / "m", "pytorch_model.bin: PyTorch pickle weights.*save_pretrained\\(OUT, safe_serialization=True\\)")
    assert not marker.exists()


def test_other_bad_paths(tmp_path):
    scan_fails(tmp_path / "nothing-here", "no such file or directory")
    (tmp_path / "notes.txt").write_text("hello")
    scan_fails(tmp_path / "notes.txt", "neither a model directory nor a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    scan_fails(tmp_path / "empty.gguf", "not a GGUF file")


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The in-process runner cannot show what the interpreter prints at exit; a real process can."""
    llama_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 4)
    assert_user_error(swtool("scan", tmp_path / "m"), "truncated safetensors file")


# -- random damage (hypothesis) ---------------------------------------------------------


def open_and_read(path: Path) -> None:
    """What every command does first: open, then stream every tensor."""
    checkpoint = open_checkpoint(path)
    for name in checkpoint.names():
        checkpoint.load(name)
    checkpoint.close()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@FAST
@given(tensor=st.integers(0, 20), field=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), value=JSON_VALUES)
def test_random_header_values(tmp_path_factory, tensor, field, value):
    model = tmp_path_factory.mktemp("m")
    tensors = llama_tensors(CONFIG)
    name = list(tensors)[tensor]
    llama_dir(model, tensors=tensors)
    rewrite(model, safetensors_bytes(tensors, lambda h: h[name].update({field: value})))
    try:
        open_and_read(model)
    except SwtoolError:
        pass


@FAST
@given(data=st.data())
def test_random_byte_damage_safetensors(tmp_path_factory, data):
    model = tmp_path_factory.mktemp("m")
    llama_dir(model)
    raw = bytearray((model / "model.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end + 16))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    rewrite(model, bytes(raw[:cut]))
    try:
        open_and_read(model)
    except SwtoolError:
        pass


@FAST
@given(data=st.data())
def test_random_byte_damage_gguf(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    gguf_file(path)
    raw = bytearray(path.read_bytes())
    header = raw.index(b"output.weight") + 64  # past the last tensor info: the whole header
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    path.write_bytes(bytes(raw[:cut]))
    try:
        open_and_read(path)
    except SwtoolError:
        pass


@FAST
@given(key=st.sampled_from(sorted(CONFIG)), value=JSON_VALUES)
def test_random_config_values(tmp_path_factory, key, value):
    model = tmp_path_factory.mktemp("m")
    llama_dir(model)
    set_config(model, **{key: value})  # None removes the key
    try:
        open_and_read(model)
    except SwtoolError:
        pass
