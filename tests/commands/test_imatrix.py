"""`swtool imatrix` against llama-imatrix's own files (goldens), transformers hooks, and as a command.

The goldens in tests/fixtures/imatrix were written by llama-imatrix on tiny random models
(tests/helpers/imatrix_golden.py (python -m tests.helpers.imatrix_golden) regenerates them); the same models are rebuilt here from their
seeds, so swtool's values, counts, keys, names, types and shapes are compared with llama.cpp's
in the default suite, without llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from swtool.formats.open import open_checkpoint
from swtool.formats.gguf.imatrix import Entry, Imatrix, read_imatrix, write_imatrix
from swtool.formats.gguf.imatrix_stats import imatrix_stats
from swtool.imatrix import collected_tokens, compute_imatrix, cut_chunks, imatrix
from swtool.input_sums import input_sums
from tests.helpers.clirun import assert_user_error, invoke, snapshot

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "imatrix"
CASES = json.loads((FIXTURES / "cases.json").read_text())


def option(options: list[str], flag: str, default: int | None = None) -> int | None:
    return int(options[options.index(flag) + 1]) if flag in options else default


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    """name -> a folder holding that case's tiny GGUF (rebuilt from its seed) and text.txt, as the generator made them."""
    from tests.helpers.gguf_tiny import convert
    from tests.helpers.imatrix_golden import TEXT, sha256
    from tests.helpers.tiny import build

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            spec = CASES[name]
            folder = tmp_path_factory.mktemp(name)
            build(spec["family"], folder / "hf", seed=spec["seed"])
            convert(folder / "hf", folder / "tiny.gguf", bos=spec["bos"])
            assert sha256(folder / "tiny.gguf") == spec["model_sha256"], "the tiny model generator changed: run tests/helpers/imatrix_golden.py (python -m tests.helpers.imatrix_golden)"
            (folder / "text.txt").write_text(TEXT)
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="module")
def swtool_file(case_dir):
    """name -> swtool's imatrix for that golden case, with the case's -c/-b/--chunks and the same dataset name (made once)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = case_dir(name)
            options = CASES[name]["options"]
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(folder)  # the dataset is recorded as given: "text.txt", as the generator ran llama-imatrix
                imatrix(open_checkpoint(folder / "tiny.gguf"), Path("text.txt"), folder / "swtool.gguf", ctx=option(options, "-c"),
                        chunks=option(options, "--chunks"), batch=option(options, "-b"))
            made[name] = folder / "swtool.gguf"
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_counts_agree_with_llama_imatrix(swtool_file, name):
    ours = read_imatrix(swtool_file(name))
    theirs = read_imatrix(FIXTURES / f"{name}.gguf")
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == (theirs.datasets, theirs.chunk_count, theirs.chunk_size)
    assert sorted(ours.entries) == sorted(theirs.entries)
    for weight, want in theirs.entries.items():
        got = ours.entries[weight]
        np.testing.assert_array_equal(got.counts, want.counts, err_msg=weight)
        scale = np.abs(want.in_sum2).max()
        np.testing.assert_allclose(got.in_sum2, want.in_sum2, rtol=2e-5, atol=2e-6 * scale, err_msg=weight)
        np.testing.assert_allclose(got.in_sum, want.in_sum, rtol=2e-4, atol=2e-5 * np.abs(want.in_sum).max(), err_msg=weight)
        np.testing.assert_allclose(got.stats, want.stats, rtol=2e-3, atol=1e-5, equal_nan=True, err_msg=weight)


def test_the_token_rules_show_in_the_goldens():
    """What the goldens pin down: every token counts, except the 8-token tail batch of -c 40 -b 32; experts count per route."""
    llama = read_imatrix(FIXTURES / "llama.gguf")
    assert {float(e.counts[0]) for e in llama.entries.values()} == {9 * 32}
    short = read_imatrix(FIXTURES / "llama-b32.gguf")
    chunks = len(TEXT_TOKENS()) // 40
    assert {float(e.counts[0]) for e in short.entries.values()} == {chunks * 32}
    mixtral = read_imatrix(FIXTURES / "mixtral.gguf")
    experts = mixtral.entries["blk.0.ffn_down_exps.weight"]
    tokens = mixtral.chunk_count * 32
    assert experts.counts.shape == (4,) and experts.counts.sum() == 2 * tokens  # two experts per token
    assert mixtral.entries["blk.0.ffn_gate_inp.weight"].counts.tolist() == [tokens]


def TEXT_TOKENS() -> bytes:
    from tests.helpers.imatrix_golden import TEXT

    return TEXT.encode()


@pytest.mark.parametrize("name", sorted(CASES))
def test_file_has_llama_imatrix_keys_names_types_and_shapes(swtool_file, name):
    ours = gguf.GGUFReader(swtool_file(name))
    theirs = gguf.GGUFReader(FIXTURES / f"{name}.gguf")

    def keys(reader):
        return [(k, [t.name for t in f.types]) for k, f in reader.fields.items() if not k.startswith(("GGUF.", "swtool."))]

    def tensors(reader):
        return [(t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors]

    assert keys(ours) == keys(theirs)
    assert tensors(ours) == tensors(theirs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_writer_reproduces_llama_imatrix_bytes(name, tmp_path):
    """Read llama-imatrix's file and write it back: byte for byte the same (header, key order, alignment, data)."""
    out = tmp_path / "copy.gguf"
    write_imatrix(out, read_imatrix(FIXTURES / f"{name}.gguf"))
    assert out.read_bytes() == (FIXTURES / f"{name}.gguf").read_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_stats_from_llama_sums_are_llama_stats(name):
    entries = read_imatrix(FIXTURES / f"{name}.gguf").entries
    ours = imatrix_stats({k: Entry(e.in_sum2, e.counts, e.in_sum) for k, e in entries.items()})
    for weight, entry in entries.items():
        np.testing.assert_allclose(ours[weight], entry.stats, rtol=1e-6, atol=0, equal_nan=True, err_msg=weight)


def test_legacy_dat_reads_as_the_same_means():
    """llama-imatrix --output-format dat of the same run: per weight mean * ncall with ncall its chunks."""
    dat = read_imatrix(FIXTURES / "llama.dat")
    new = read_imatrix(FIXTURES / "llama.gguf")
    assert dat.legacy and dat.chunk_count == new.chunk_count and dat.datasets == new.datasets
    assert sorted(dat.entries) == sorted(new.entries)
    for weight, entry in new.entries.items():
        ncall = float(dat.entries[weight].counts[0])
        assert ncall == np.ceil(entry.counts.max() / new.chunk_size)
        np.testing.assert_allclose(dat.entries[weight].in_sum2 / ncall, entry.means().reshape(1, -1), rtol=1e-6)


def test_reader_refuses_what_is_not_an_imatrix(tmp_path, case_dir):
    from swtool.errors import SwtoolError

    with pytest.raises(SwtoolError, match="not an importance matrix"):
        read_imatrix(case_dir("llama") / "tiny.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(SwtoolError, match="legacy imatrix"):
        read_imatrix(tmp_path / "junk.dat")


# -- against transformers, on HF directories -----------------------------------------------------


def hooked_sums(model: torch.nn.Module, windows: torch.Tensor, keep: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Canonical name -> (sum of x^2 per input column, tokens) from forward hooks on the transformers model.

    Dense projections count the tokens `keep` marks; routed experts (3-D parameters in
    transformers, no module each) get their inputs rebuilt from the routing the hook sees.
    """
    sums: dict[str, list] = {}

    def add(name: str, rows: torch.Tensor) -> None:
        entry = sums.setdefault(name, [torch.zeros(rows.shape[-1], dtype=torch.float64), 0])
        entry[0] += rows.double().pow(2).sum(0)
        entry[1] += rows.shape[0]

    mask = keep.reshape(-1)
    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.startswith("model.layers."):
            handles.append(module.register_forward_pre_hook(lambda m, args, n=module_name: add(f"{n}.weight", args[0].reshape(-1, args[0].shape[-1])[mask])))
        if type(module).__name__.endswith("TopKRouter"):
            name = module_name.replace(".mlp.gate", ".block_sparse_moe.gate") + ".weight"
            handles.append(module.register_forward_pre_hook(lambda m, args, n=name: add(n, args[0].reshape(-1, args[0].shape[-1])[mask])))
        if type(module).__name__.endswith("Experts"):
            prefix = module_name.replace(".mlp.experts", ".block_sparse_moe.experts")

            def experts(m, args, prefix=prefix):
                x, chosen = args[0], args[1]
                for e in range(m.num_experts):
                    rows = x[(chosen == e).any(dim=-1)]
                    if not len(rows):
                        continue
                    gate, up = torch.nn.functional.linear(rows, m.gate_up_proj[e]).chunk(2, dim=-1)
                    add(f"{prefix}.{e}.w1.weight", rows)
                    add(f"{prefix}.{e}.w3.weight", rows)
                    add(f"{prefix}.{e}.w2.weight", m.act_fn(gate) * up)

            handles.append(module.register_forward_pre_hook(experts))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: (v[0], v[1]) for k, v in sums.items()}


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_sums_equal_transformers_hooks(tmp_path, family):
    from tests.helpers.tiny import build

    model = build(family, tmp_path, seed=3)
    windows = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(5, 24, dtype=torch.bool)
    keep[:, 20:] = False  # a tail llama.cpp would not collect for dense products
    keep[4, 8:] = False
    ours = input_sums(open_checkpoint(tmp_path), windows, keep=keep, batch=2)
    theirs = hooked_sums(model, windows, keep)
    assert sorted(ours) == sorted(theirs)
    assert any(".experts." in name for name in ours) == (family == "mixtral")
    for name, (square, count) in theirs.items():
        assert ours[name].count == count, name
        torch.testing.assert_close(ours[name].in_sum2, square, rtol=1e-5, atol=1e-6 * float(square.max()))
    assert ours["model.layers.0.self_attn.q_proj.weight"].count == int(keep.sum())


def test_collected_tokens_follow_llama_batches():
    assert collected_tokens(6, 512, 2048).all()  # the defaults: every token counts
    tail = collected_tokens(3, 40, 32)  # 32 + 8 tokens per chunk: the 8 are not collected
    assert tail[:, :32].all() and not tail[:, 32:].any()
    assert not collected_tokens(1, 8, 2048).any()  # one 8-token chunk alone in its batch
    assert collected_tokens(2, 8, 2048).all()  # two chunks share a 16-token micro-batch
    equal = collected_tokens(2, 40, 80, ubatch=24)  # two sequences, 12 positions of each per micro-batch
    assert equal[:, :36].all() and not equal[:, 36:].any()


def test_chunks_need_twice_ctx_and_replace_the_first_token_by_bos():
    from swtool.errors import SwtoolError

    cut = cut_chunks(list(range(100, 200)), 30, None, bos=7)
    assert cut.windows.shape == (3, 30) and cut.windows[:, 0].tolist() == [7, 7, 7]
    assert cut.windows[1, 1:].tolist() == list(range(131, 160))
    assert cut_chunks(list(range(100)), 30, 2, None).windows.shape == (2, 30)
    with pytest.raises(SwtoolError, match="at least 2 x ctx = 120"):
        cut_chunks(list(range(100)), 60, None, None)


def test_compute_imatrix_in_memory_matches_a_disk_buffer(case_dir):
    """Hidden states spilled to a temporary file (a tiny memory limit) give the same sums."""
    checkpoint = open_checkpoint(case_dir("llama") / "tiny.gguf")
    cut = cut_chunks(list(range(32, 32 + 200)), 32, None, None)
    a = compute_imatrix(checkpoint, cut, "t", batch=64)
    b = compute_imatrix(checkpoint, cut, "t", batch=64, memory_limit=0)
    for name in a.entries:
        np.testing.assert_array_equal(a.entries[name].in_sum2, b.entries[name].in_sum2)


# -- the command ----------------------------------------------------------------------------------


def test_cli_json_summary_provenance_and_llama_keys(case_dir, tmp_path):
    folder = case_dir("llama")
    out = tmp_path / "out" / "m.imatrix.gguf"
    result = invoke("imatrix", folder / "tiny.gguf", "--text", folder / "text.txt", "-o", out, "--ctx", "32", "--chunks", "4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == {"model": str(folder / "tiny.gguf"), "text": str(folder / "text.txt"), "output": str(out), "tensors": 28, "chunks": 4,
                   "ctx": 32, "tokens": 128, "text_tokens": len(TEXT_TOKENS()) + 1}
    written = read_imatrix(out)
    assert written.chunk_count == 4 and written.datasets == [str(folder / "text.txt")]
    assert json.loads(written.metadata["swtool.options"]) == {"batch": 2048, "builtin": False, "chunks": 4, "ctx": 32, "dtype": "fp32", "ubatch": 512}
    digest = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("tiny.gguf", "text.txt")}
    assert json.loads(written.metadata["swtool.inputs"]) == digest  # sealed into the file after it was written
    assert written.metadata["swtool.command"] == "imatrix"


def test_cli_output_is_deterministic(case_dir, tmp_path):
    folder = case_dir("mixtral")
    for name in ("a.gguf", "b.gguf"):
        assert invoke("imatrix", folder / "tiny.gguf", "--text", folder / "text.txt", "-o", tmp_path / name, "--ctx", "32", "--chunks", "3", "-q").exit_code == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_cli_bad_input_is_one_line_and_writes_nothing(case_dir, tmp_path):
    folder = case_dir("llama")
    model, out = folder / "tiny.gguf", tmp_path / "out.gguf"
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "short.txt").write_text("a few words only")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "notamodel").mkdir()
    before = snapshot(tmp_path)
    cases = [
        (("--text", tmp_path / "empty.txt"), "text is empty"),
        (("--text", tmp_path / "short.txt"), r"17 tokens; llama-imatrix needs at least 2 x ctx = 1024"),
        (("--text", tmp_path / "bad.txt"), "cannot read as UTF-8"),
        (("--text", tmp_path / "missing.txt"), "cannot read"),
        (("--text", folder / "text.txt", "--chunks", "0", "--ctx", "32"), "--chunks must be at least 1"),
        (("--text", folder / "text.txt", "--batch", "0", "--ctx", "32"), "--batch must be at least 1"),
        (("--text", folder / "text.txt", "--ubatch", "0", "--ctx", "32"), "--ubatch must be at least 1"),
    ]
    for args, message in cases:
        assert_user_error(invoke("imatrix", model, *args, "-o", out), message)
    assert_user_error(invoke("imatrix", tmp_path / "notamodel", "--text", folder / "text.txt", "-o", out), "notamodel")
    assert snapshot(tmp_path) == before
    out.write_bytes(b"keep me")
    assert_user_error(invoke("imatrix", model, "--text", folder / "text.txt", "-o", out, "--ctx", "32"), "already exists")
    assert out.read_bytes() == b"keep me"


def test_means_of_an_unused_expert_are_one():
    entry = Entry(np.array([[4.0, 8.0], [0.0, 0.0]], np.float32), np.array([2.0, 0.0], np.float32))
    assert entry.means().tolist() == [[2.0, 4.0], [1.0, 1.0]]
    Imatrix({"w": entry}, ["t"], 1, 2)  # constructible without stats or in_sum (legacy-like data)


def test_tokenize_reads_control_tokens_as_text_and_adds_bos():
    """llama-imatrix tokenizes with parse_special=false: CONTROL tokens' text is plain text, USER_DEFINED tokens still match."""
    from types import SimpleNamespace

    from swtool.imatrix import tokenize
    from swtool.formats.gguf.tokenizer import gguf_tokenizer

    tokens = [chr(c) for c in range(97, 123)] + ["<", ">", "<ctl>", "<usr>", "<s>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [1] * 28 + [3, 4, 3], "tokenizer.ggml.bos_token_id": 30, "tokenizer.ggml.add_bos_token": True}
    checkpoint = SimpleNamespace(path="m.gguf", tokenizer=lambda: gguf_tokenizer(meta))
    ids, bos = tokenize(checkpoint, "ab<ctl><usr>")
    assert bos == 30
    assert [tokens[i] for i in ids] == ["<s>", "a", "b", "<", "c", "t", "l", ">", "<usr>"]
    meta["tokenizer.ggml.add_bos_token"] = False
    assert tokenize(checkpoint, "ab") == ([0, 1], None)


def test_an_hf_directory_gives_the_gguf_names_and_values_of_its_conversion(tmp_path):
    """The same tiny Mixtral as an HF directory and as llama.cpp's GGUF: the same entries (experts merged under GGUF names)."""
    from tests.helpers.gguf_tiny import convert
    from tests.helpers.tiny import build

    build("mixtral", tmp_path / "hf", seed=2)
    convert(tmp_path / "hf", tmp_path / "tiny.gguf")
    cut = cut_chunks(list(range(40, 240)), 32, None, None)
    hf = compute_imatrix(open_checkpoint(tmp_path / "hf"), cut, "t", batch=64)
    gg = compute_imatrix(open_checkpoint(tmp_path / "tiny.gguf"), cut, "t", batch=64)
    assert sorted(hf.entries) == sorted(gg.entries) and "blk.1.ffn_up_exps.weight" in hf.entries
    for name, entry in gg.entries.items():
        np.testing.assert_array_equal(hf.entries[name].counts, entry.counts)
        np.testing.assert_allclose(hf.entries[name].in_sum2, entry.in_sum2, rtol=1e-5, atol=1e-6 * float(entry.in_sum2.max()))


def test_builtin_text_gives_a_data_free_imatrix(tmp_path, smollm2_gguf):
    """--builtin calibrates on the text scan verifies with: at least two 512-token chunks of it, provenance says so."""
    out = tmp_path / "builtin.imatrix.gguf"
    result = invoke("imatrix", smollm2_gguf, "--builtin", "-o", out, "--ctx", "512", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["chunks"] == 2 and doc["tokens"] == 1024 and doc["text"].endswith("builtin_text.txt")
    written = read_imatrix(out)
    assert json.loads(written.metadata["swtool.options"])["builtin"] is True
    assert written.entries["blk.11.ffn_down.weight"].counts.sum() > 0


def test_text_and_builtin_exclude_each_other(tmp_path, case_dir):
    folder = case_dir("llama")
    for extra in ([], ["--builtin", "--text", folder / "text.txt"]):
        result = invoke("imatrix", folder / "tiny.gguf", "-o", tmp_path / "x.gguf", *extra)
        assert result.exit_code == 2 and "--builtin" in result.stderr
