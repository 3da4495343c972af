"""`swtool quantize HF_DIR --format gguf` for every family: swtool reads the file back as the HF directory,
and llama.cpp runs it as swtool does (with SWTOOL_LLAMA_CPP set)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
from clirun import assert_user_error, invoke
from test_gguf_families import CASES, chunk_perplexities, logits
from tiny import build

from swtool.formats.open import open_checkpoint
from swtool.model.tokenizer import encode

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SCALED = {
    "llama-llama3": {"rope_parameters": LLAMA3_ROPE, "rope_scaling": LLAMA3_ROPE},
    "gemma3_text-linear": {**CASES["gemma3_text"], "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }},
    "phi3-longrope": {**CASES["phi3"], "max_position_embeddings": 256, "original_max_position_embeddings": 32, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32,
        "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 3.5, 6.0],
    }},
}
"""RoPE scaling llama.cpp applies its own way: llama3 through the rope_freqs tensor, linear on Gemma-3's global layers only,
Phi-3's LongRoPE through rope_factors_long/short (long ones here, where llama.cpp's context and swtool's 64-token
chunks both exceed the original 32)."""
OPTIONS = {**CASES, **SCALED}
FAMILIES = ["llama", "llama-tied", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gemma3_text", "mixtral", *SCALED]
TYPES = ("F32", "Q8_0")
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


def add_byte_merge(directory: Path) -> None:
    """llama.cpp refuses a gpt2 vocabulary without merges: merge the bytes 0x00 0x01 (never adjacent in the
    test text) into id 256, so tokenization stays byte by byte for swtool, transformers and llama.cpp alike."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"]["\u0100\u0101"] = 256
    data["model"]["merges"] = [["\u0100", "\u0101"]]
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family case, HF directory, {type: GGUF file written by the CLI})."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    build(case.split("-")[0], root / "hf", **OPTIONS[case])
    add_byte_merge(root / "hf")
    files = {}
    for type_name in TYPES:
        files[type_name] = root / f"{type_name}.gguf"
        result = invoke("quantize", root / "hf", "-o", files[type_name], "--format", "gguf", "--type", type_name, "--no-keep-super", "-q")
        assert result.exit_code == 0, result.output
    return case, root / "hf", files


def test_swtool_reads_the_gguf_back_as_the_hf_directory(converted):
    case, hf_dir, files = converted
    hf = open_checkpoint(hf_dir)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    reference = logits(hf, tokens)
    scale = float(reference.abs().max())
    f32, q8 = open_checkpoint(files["F32"]), open_checkpoint(files["Q8_0"])
    assert encode(f32, TEXT) == encode(hf, TEXT)
    for name in hf.names():
        if name == "lm_head.weight" and hf.config.tie_embeddings:
            continue
        torch.testing.assert_close(f32.load(name), hf.load(name), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")  # Gemma: (1 + w) - 1
        if len(hf.shape(name)) == 2:  # Q8_0: within half a step of each 32-block's scale, so of the tensor's max/127
            bound = float(hf.load(name).abs().max()) / 127
            assert float((q8.load(name) - hf.load(name)).abs().max()) <= bound, name
    torch.testing.assert_close(logits(f32, tokens), reference, rtol=0, atol=1e-4 * scale)
    assert float((logits(q8, tokens) - reference).abs().max()) < 0.05 * scale
    types = {t.name: t.tensor_type.name for t in q8.reader.tensors}
    assert types["blk.0.ffn_down_exps.weight" if case == "mixtral" else "blk.0.ffn_down.weight"] == "Q8_0"


def test_phi3_longrope_travels_as_factor_tensors(tmp_path):
    """LongRoPE becomes llama.cpp's rope_factors_long/short and attn_factor key; swtool reads them back as the
    HF config's scaling, so prompts shorter and longer than the original context give the HF directory's logits."""
    build("phi3", tmp_path / "hf", **OPTIONS["phi3-longrope"])
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    reader = gguf.GGUFReader(out)
    factors = {t.name: [float(v) for v in t.data] for t in reader.tensors if t.name.startswith("rope_factors")}
    assert factors == {"rope_factors_long.weight": [1.0, 2.0, 3.5, 6.0], "rope_factors_short.weight": pytest.approx([1.0, 1.1, 1.3, 1.6])}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["phi3.rope.scaling.original_context_length"] == 32
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + math.log(8) / math.log(32)) ** 0.5)
    hf, gg = open_checkpoint(tmp_path / "hf"), open_checkpoint(out)
    for length in (20, 60):  # short factors, then long ones
        tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        reference = logits(hf, tokens)
        torch.testing.assert_close(logits(gg, tokens), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_mixtral_experts_are_one_3d_tensor_per_projection(tmp_path):
    build("mixtral", tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    reader = gguf.GGUFReader(out)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.1.ffn_down_exps.weight"] == [128, 64, 4]  # GGUF order: (in, out, expert)
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == [64, 128, 4]
    assert shapes["blk.1.ffn_gate_inp.weight"] == [64, 4]
    assert not any("experts." in name or "ffn_down.weight" in name for name in shapes)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    hf = open_checkpoint(tmp_path / "hf")
    data = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight").data
    assert torch.equal(torch.from_numpy(data[2].copy()), hf.load("model.layers.1.block_sparse_moe.experts.2.w2.weight"))


def test_a_planted_expert_super_weight_is_found_held_and_recorded_with_its_expert(tmp_path):
    """quantize --format gguf --keep-super on an HF Mixtral: the scan finds the weight in expert 1,
    the merged tensor holding it is raised to Q8_0, and the record names the expert.

    A tiny random model's perplexity does not depend on the planted weight, so the scan lists
    it as a candidate, not a super weight; its scan entry is handed to quantize with --super."""
    from tiny import plant

    model = build("mixtral", tmp_path / "hf", seed=1)
    plant(model, tmp_path / "hf", [(1, 5, 17, 1)])  # expert 1 of this seed gets tokens on which channel 17 fires
    scanned = json.loads(invoke("scan", tmp_path / "hf", "--json").stdout)
    entry = [c for c in scanned["candidates"] if (c["layer"], c["row"], c["col"], c["expert"]) == (1, 5, 17, 1)]
    assert len(entry) == 1
    (tmp_path / "scan.json").write_text(json.dumps({"model": "m", "super_weights": entry}))
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "Q4_0", "--keep-super", "--super", tmp_path / "scan.json")
    assert result.exit_code == 0, result.output
    assert "written as Q8_0" in result.output
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.ffn_down_exps.weight"] == "Q4_0"
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("swtool.super_weights.")}
    assert meta["swtool.super_weights.tensor"] == ["blk.1.ffn_down_exps.weight"]
    assert meta["swtool.super_weights.expert"] == [1] and meta["swtool.super_weights.row"] == [5] and meta["swtool.super_weights.col"] == [17]
    weight = open_checkpoint(out).load("model.layers.1.block_sparse_moe.experts.1.w2.weight")[5, 17]
    assert abs(float(weight) - 30.0) < 0.2  # Q8_0 of the planted 30.0


def test_a_model_gguf_cannot_express_is_refused_in_one_line_and_leaves_no_file(tmp_path):
    build("gemma2", tmp_path / "hf")  # query_pre_attn_scalar 24, but llama.cpp scales gemma2 queries by head_dim (16)
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q")
    assert_user_error(result, "query_pre_attn_scalar 24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_architecture_llama_cpp_lacks_is_refused_in_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import dataclasses

    import swtool.formats.gguf.writer as gguf_out

    build("olmo2", tmp_path / "hf")
    family = gguf_out.family_for("olmo2")
    monkeypatch.setattr(gguf_out, "family_for", lambda *_: dataclasses.replace(family, gguf_arch=None))
    result = invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--no-keep-super", "-q")
    assert_user_error(result, "model_type 'olmo2': llama.cpp has no architecture for it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.llamacpp
def test_llama_cpp_runs_swtool_gguf_as_swtool_does(converted, tmp_path):
    """llama-perplexity's running perplexity per 64-token chunk equals swtool's forward on the same file:
    within 2e-3 at F32; within 3e-2 at Q8_0, where llama.cpp also rounds the activations to 8 bits."""
    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    if not folder:
        pytest.skip("set SWTOOL_LLAMA_CPP to the folder of llama.cpp's binaries (llama-perplexity)")
    _, _, files = converted
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for type_name, tolerance in zip(TYPES, (2e-3, 3e-2)):
        run = subprocess.run(
            [str(Path(folder) / "llama-perplexity"), "-m", str(files[type_name]), "-f", str(text), "-c", "64", "-b", "64", "-t", "1"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "LD_LIBRARY_PATH": folder},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", run.stdout + run.stderr)]
        checkpoint = open_checkpoint(files[type_name])
        ours = chunk_perplexities(checkpoint, encode(checkpoint, text.read_text()), 64)
        # llama.cpp logs from a worker thread and now and then loses the end of its last line at exit: compare the
        # values it printed whole (each is followed by a comma)
        assert len(ours) >= len(theirs) >= 3
        assert ours[: len(theirs)] == pytest.approx(theirs, rel=tolerance), type_name


SPECIALS = ["<unk>", "<s>", "</s>"]


def write_sentencepiece_tokenizer(directory: Path, text: str, size: int, style: str) -> None:
    """A SentencePiece-style tokenizer.json as Llama-2, Mistral, Phi-3 and Gemma ship: BPE with byte fallback
    over "\u2581"-for-space text, <unk> <s> </s> then the 256 byte tokens. `style`: "prepend" (normalizers
    Prepend + Replace, older Llama files), "none" (Replace only, Gemma), "metaspace" (a Metaspace
    pre-tokenizer that prepends, newer Llama/Mistral files)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if style == "prepend" else []) + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    lines = [line for line in text.split("\n") if line.strip()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size - 256, special_tokens=SPECIALS, show_progress=False, limit_alphabet=120))
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    final = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [t for t in trained if t not in SPECIALS]
    data["model"]["vocab"] = {t: i for i, t in enumerate(final)}
    for added in data["added_tokens"]:
        added["id"] = final.index(added["content"])
    (directory / "tokenizer.json").write_text(json.dumps(data))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def llama_cpp_spm(meta: dict, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), transcribed: merge the adjacent pair whose
    joined text is the token of highest score (leftmost on ties) until none is left; unknown characters
    fall back to byte tokens."""
    import heapq

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    text = ("\u2581" if meta.get("tokenizer.ggml.add_space_prefix", True) else "") + text.replace(" ", "\u2581")
    symbols = list(text)
    alive = [True] * len(symbols)
    nxt, prv = list(range(1, len(symbols) + 1)), list(range(-1, len(symbols) - 1))
    queue: list = []

    def push(left: int, right: int) -> None:
        if left < 0 or right >= len(symbols):
            return
        joined = symbols[left] + symbols[right]
        if joined in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, joined, right))

    for i in range(1, len(symbols)):
        push(i - 1, i)
    while queue:
        _, left, joined, right = heapq.heappop(queue)
        if not (alive[left] and alive[right]) or symbols[left] + symbols[right] != joined or nxt[left] != right:
            continue
        symbols[left], alive[right] = joined, False
        nxt[left] = nxt[right]
        if nxt[right] < len(symbols):
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out = []
    for symbol, keep in zip(symbols, alive):
        if keep:
            out += [ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()]
    return out


SENTENCEPIECE_CASES = [("llama", "prepend"), ("gemma", "none"), ("mixtral", "metaspace")]


@pytest.mark.parametrize("family, style", SENTENCEPIECE_CASES)
def test_sentencepiece_style_tokenizers_become_llama_vocabularies(family, style, wiki_text, tmp_path):
    """Byte-fallback BPE tokenizer.json -> tokenizer.ggml.model = llama with scores from the merge ranks;
    llama.cpp's SentencePiece algorithm on the written vocabulary gives the HF tokenizer's ids."""
    from tokenizers import Tokenizer

    build(family, tmp_path / "hf", **{**CASES[family], "vocab_size": 1024})
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, style)
    out = tmp_path / "m.gguf"
    result = invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q")
    assert result.exit_code == 0, result.output
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is (style != "none")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 1024 and tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL and types[1023] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.add_bos_token"] is False
    hf = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    sample = wiki_text[300_000:303_000] + " naïve café 東京 \u2603"  # characters outside the vocabulary fall back to bytes
    assert llama_cpp_spm(meta, sample) == hf.encode(sample).ids
    assert encode(open_checkpoint(out), sample) == hf.encode(sample).ids  # swtool's reader of the file, too


@pytest.mark.llamacpp
@pytest.mark.parametrize("family, style", SENTENCEPIECE_CASES)
def test_llama_cpp_tokenizes_a_sentencepiece_style_vocabulary_as_transformers(family, style, wiki_text, tmp_path):
    """llama-perplexity on the file gives the running perplexities swtool's forward gives on the HF
    directory, tokenized by its tokenizer.json: the same tokens, chunk for chunk."""
    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    if not folder:
        pytest.skip("set SWTOOL_LLAMA_CPP to the folder of llama.cpp's binaries (llama-perplexity)")
    build(family, tmp_path / "hf", **{**CASES[family], "vocab_size": 1024})
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, style)
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    text = tmp_path / "text.txt"
    text.write_text(wiki_text[300_000:302_500])
    run = subprocess.run(
        [str(Path(folder) / "llama-perplexity"), "-m", str(out), "-f", str(text), "-c", "128", "-b", "128", "-t", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LD_LIBRARY_PATH": folder},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", run.stdout + run.stderr)]
    hf = open_checkpoint(tmp_path / "hf")
    ours = chunk_perplexities(hf, encode(hf, text.read_text()), 128)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", run.stdout + run.stderr)
    assert chunks and int(chunks.group(1)) == len(ours) >= 6  # the same number of tokens
    assert len(theirs) >= len(ours) - 1
    assert ours[: len(theirs)] == pytest.approx(theirs, rel=2e-3)


def llama_cpp_vocabularies() -> Path:
    """llama.cpp's own tokenizer test data: vocabulary-only GGUFs of real models with inputs and the ids
    transformers gives them, beside the binaries (build/bin/../../models)."""
    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    models = Path(folder).resolve().parents[1] / "models" if folder else None
    if models is None or not (models / "ggml-vocab-llama-spm.gguf.out").is_file():
        pytest.skip("set SWTOOL_LLAMA_CPP to llama.cpp's build/bin, with the source tree's models/ two levels up")
    return models


def vocabulary_cases(models: Path, name: str) -> tuple[dict, list[tuple[str, list[int]]]]:
    from swtool.formats.gguf.reader import read_metadata

    meta = read_metadata(gguf.GGUFReader(models / f"ggml-vocab-{name}.gguf"))
    inputs = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return meta, [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_real_sentencepiece_vocabularies_read_and_written_tokenize_as_transformers(name, tmp_path):
    """Llama-2's and Phi-3's real vocabularies (llama.cpp's test files): swtool's reader of the GGUF gives
    transformers' ids on all 47 test inputs; and written back from the tokenizer.json swtool makes of it,
    the vocabulary llama.cpp's algorithm reads gives them too."""
    from tokenizers import Tokenizer

    from swtool.formats.gguf.metadata import tokenizer_metadata
    from swtool.formats.gguf.tokenizer import gguf_tokenizer_json

    meta, cases = vocabulary_cases(llama_cpp_vocabularies(), name)
    assert meta["tokenizer.ggml.model"] == "llama" and len(cases) == 47
    read = Tokenizer.from_str(gguf_tokenizer_json(meta))
    assert [read.encode(text, add_special_tokens=False).ids for text, _ in cases] == [ids for _, ids in cases]
    (tmp_path / "tokenizer.json").write_text(gguf_tokenizer_json(meta))
    written, _ = tokenizer_metadata(tmp_path, len(meta["tokenizer.ggml.tokens"]), "llama")
    written = {key: value.value for key, value in written.items()}
    assert written["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"] and written["tokenizer.ggml.add_space_prefix"] is True
    assert [llama_cpp_spm(written, text) for text, _ in cases if text] == [ids for text, ids in cases if text]
