"""SentencePiece-style vocabularies through GGUF: written as llama.cpp's `llama` vocabulary, tokenizing as
transformers does (by llama.cpp's algorithm, by swtool's reader, by llama.cpp itself), and coming back
from a GGUF as the same tokenizer.json.

llama.cpp checks are marked `llamacpp` and need SWTOOL_LLAMA_CPP (the real vocabularies also need the
llama.cpp source tree's models/ two levels above its build/bin).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest

from swtool.formats.open import open_checkpoint
from swtool.model.tokenizer import encode
from tests.helpers import llamacpp
from tests.helpers.clirun import invoke
from tests.helpers.families import GGUF_CASES
from tests.helpers.forward import chunk_perplexities
from tests.helpers.tiny import build

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


def string_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The merges of a `llama` vocabulary by their definition, one Python string at a time: every split of a
    normal or user-defined token into two tokens, ranked by the joined token's score, then id, then cut."""
    known = set(tokens)
    ranked = sorted(
        (-float(score), i, cut)
        for i, (text, score, kind) in enumerate(zip(tokens, scores, types))
        if kind in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)
        for cut in range(1, len(text))
        if text[:cut] in known and text[cut:] in known
    )
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def awkward_vocabulary(wiki_text: str) -> dict:
    """A trained byte-fallback vocabulary plus what a hashed search of splits could get wrong: characters outside
    the BMP, NUL characters (a zero code), a duplicated token, splittable control and byte-like tokens (never split),
    user-defined ones (split), tied scores and both signed zeros."""
    from tokenizers import Tokenizer, models, trainers

    trainee = Tokenizer(models.BPE())
    trainee.train_from_iterator([wiki_text[:60_000]], trainers.BpeTrainer(vocab_size=1500, show_progress=False))
    trained = sorted(trainee.get_vocab(), key=trainee.get_vocab().get)
    extra = ["\U0001F600", "\U0001F600\U0001F600", "a\U0001F600", "\x00", "a\x00", "\x00a", "\x00\x00", "the\x00", "the", "ab", "<0x41>", "<", ">", "0x41>", "th\U0001F600"]
    kinds = {"ab": gguf.TokenType.CONTROL, "<0x41>": gguf.TokenType.BYTE, "th\U0001F600": gguf.TokenType.USER_DEFINED}
    tokens = ["<unk>", "<s>", "</s>"] + trained + extra
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [int(kinds.get(t, gguf.TokenType.NORMAL)) for t in trained + extra]
    scores = [0.0, 0.0, 0.0] + [-float(i // 3) for i in range(len(trained))] + [0.0, -0.0, -5.0, -0.0, 0.0, -7.0, -7.0, -4.0, -1.0, 0.0, 0.0, 0.0, 0.0, -3.0, -2.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1}


@pytest.mark.parametrize("chunk", [5, None])
def test_merges_found_in_bulk_are_the_merges_by_definition(chunk, wiki_text, monkeypatch):
    """The hashed search of splits gives exactly the string-by-string merges, in the same order (also when the
    tokens are hashed a few at a time)."""
    from swtool.formats.gguf import tokenizer

    if chunk:
        monkeypatch.setattr(tokenizer, "SPLIT_CHUNK", chunk)
    meta = awkward_vocabulary(wiki_text)
    args = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    expected = string_merges(*args)
    assert len(expected) > 1000 and ("a", "\x00") in expected and ("\x00", "a") in expected and ("a", "\U0001F600") in expected and ("the", "\x00") in expected
    assert ("t", "h\U0001F600") not in expected and not any(left + right in ("ab", "<0x41>") for left, right in expected)
    assert tokenizer._spm_merges(*args) == expected


def test_a_hash_collision_cannot_change_the_tokenizer(wiki_text, monkeypatch):
    """Were hashes of halves to collide with tokens' (forced here: two bits of hash), the pairs with a half that is no
    token would be refused by tokenizers and dropped: the same tokenizer as without collisions."""
    import numpy as np

    from swtool.formats.gguf import tokenizer

    meta = awkward_vocabulary(wiki_text)
    clean = tokenizer.gguf_tokenizer(meta).to_str()
    real = tokenizer._substring_hashes
    monkeypatch.setattr(tokenizer, "_substring_hashes", lambda *args: real(*args) & np.uint64(3))
    args = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    assert len(tokenizer._spm_merges(*args)) > len(string_merges(*args))  # the collisions did add pairs
    assert tokenizer.gguf_tokenizer(meta).to_str() == clean


def test_a_checkpoint_builds_its_tokenizer_once(wiki_text, tmp_path):
    """A scan encodes its prompt and its verification text: one build serves both."""
    build("llama", tmp_path / "hf", **{**GGUF_CASES["llama"], "vocab_size": 1024})
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, "none")
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    for path in (out, tmp_path / "hf"):
        checkpoint = open_checkpoint(path)
        assert checkpoint.tokenizer() is checkpoint.tokenizer()
        assert checkpoint.build_tokenizer() is not checkpoint.tokenizer()


SENTENCEPIECE_CASES = [("llama", "prepend"), ("gemma", "none"), ("mixtral", "metaspace")]


@pytest.mark.parametrize("family, style", SENTENCEPIECE_CASES)
def test_sentencepiece_style_tokenizers_become_llama_vocabularies(family, style, wiki_text, tmp_path):
    """Byte-fallback BPE tokenizer.json -> tokenizer.ggml.model = llama with scores from the merge ranks;
    llama.cpp's SentencePiece algorithm on the written vocabulary gives the HF tokenizer's ids."""
    from tokenizers import Tokenizer

    build(family, tmp_path / "hf", **{**GGUF_CASES[family], "vocab_size": 1024})
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
    llamacpp.folder()
    build(family, tmp_path / "hf", **{**GGUF_CASES[family], "vocab_size": 1024})
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, style)
    out = tmp_path / "m.gguf"
    assert invoke("quantize", tmp_path / "hf", "-o", out, "--format", "gguf", "--type", "F32", "--no-keep-super", "-q").exit_code == 0
    text = tmp_path / "text.txt"
    text.write_text(wiki_text[300_000:302_500])
    output = llamacpp.perplexity_output(out, text, 128)
    theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", output)]
    hf = open_checkpoint(tmp_path / "hf")
    ours = chunk_perplexities(hf, encode(hf, text.read_text()), 128)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", output)
    assert chunks and int(chunks.group(1)) == len(ours) >= 6  # the same number of tokens
    assert len(theirs) >= len(ours) - 1
    assert ours[: len(theirs)] == pytest.approx(theirs, rel=2e-3)


def llama_cpp_vocabularies() -> Path:
    """llama.cpp's own tokenizer test data: vocabulary-only GGUFs of real models with inputs and the ids
    transformers gives them, beside the binaries (build/bin/../../models)."""
    folder = llamacpp.configured()
    models = folder.resolve().parents[1] / "models" if folder else None
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


@pytest.mark.parametrize("style", ["prepend", "none"])
def test_a_sentencepiece_style_vocabulary_comes_back_as_the_same_tokenizer(style, wiki_text, tmp_path):
    """HF (byte-fallback BPE) -> GGUF `llama` vocabulary -> dequantized tokenizer.json: the same ids as the original."""
    from tokenizers import Tokenizer

    build("llama", tmp_path / "hf", vocab_size=1024)
    write_sentencepiece_tokenizer(tmp_path / "hf", wiki_text[:100_000], 1000, style)
    assert invoke("quantize", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--format", "gguf", "--type", "Q8_0", "--no-keep-super", "-q").exit_code == 0
    assert invoke("dequantize", tmp_path / "m.gguf", "-o", tmp_path / "out").exit_code == 0
    sample = wiki_text[300_000:302_000] + " naïve 東京"
    original = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(sample).ids
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode(sample).ids == original
