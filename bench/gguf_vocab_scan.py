"""Scanning a Gemma-3-270M-shaped Q4_K_M GGUF (262,144-token SentencePiece vocabulary): swtool old and new against transformers.

    python bench/gguf_vocab_scan.py --baseline /path/to/checkout-of-d20e91e [--baseline OTHER] --repeat 3

1. Builds once (cached under --dir): an HF directory with a random Gemma3ForCausalLM of
   Gemma-3-270M's shape (bf16, tied head, one super weight planted as bench/scan_bench.py plants
   them) and a Gemma-3-style tokenizer.json of 262,144 tokens laid out as Gemma-3's (ids 0-106
   <pad> <eos> <bos> <unk> <mask> [multimodal] <unused0-98> <start_of_turn> <end_of_turn>;
   newline runs, space runs and HTML tags as plain added tokens; 256 byte-fallback tokens;
   255,999-<unused6241> at the end), its normal tokens a byte-fallback BPE trained on the
   Wikipedia fixture and three letter-for-letter transliterations of it (Cyrillic, Greek,
   Armenian: 4.9 MB of English alone runs out of merges at ~83k tokens; Gemma's vocabulary is
   multilingual too). Then `swtool quantize HF -o model-Q4_K_M.gguf --type Q4_K_M`, and a check
   of the file's tokenizer keys against what llama.cpp's Gemma-3 converter writes.
2. Times the tokenizer build alone (CPU seconds: the machine is shared), in a child per source tree:
   opening the checkpoint, building its tokenizer, `_spm_merges` alone, encoding the prompt.
3. Times, each in its own child under /usr/bin/time (wall, CPU, peak RSS), the page cache warm,
   interleaved with the order rotating every round: `swtool scan FILE --json` with each baseline
   tree and with this one, this one again with `--min-effect 0` (the planted candidate then goes
   through the perplexity verification, as a real super weight would), and transformers loading
   the same GGUF and running the prompt with down_proj hooks (bench/transformers_scan.py FILE).
4. Prints medians and ratios, and checks the prompt's token ids: every tree,
   transformers' tokenizer from the GGUF and the HF tokenizer.json it was made from must agree
   (and the two trees' ids of a longer multi-script sample with the tokenizer.json's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(HERE))

from scan_bench import Run, measure, medians  # noqa: E402

PROMPT = "Apple Inc. is a worldwide tech company."
"""swtool scan's default prompt (transformers_scan.py's default too)."""

# -- Gemma-3-270M's shape (google/gemma-3-270m config.json) ----------------------

VOCAB = 262_144
LAYERS = 18
GEMMA3_270M = dict(
    vocab_size=VOCAB,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)],
    max_position_embeddings=32_768,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    hidden_activation="gelu_pytorch_tanh",
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
PLANTED = (1, 100, 1234)
"""(layer, row, col) of the planted super weight: every token carries CARRIER_VALUE in embedding channel
CARRIER, gate/up rows `col` read it (TRIGGER), and W_down[row, col] = SUPER_VALUE, so down_proj's input
channel `col` is massive (~500 after Gemma's sqrt(hidden) embedding scale and the pre-MLP norm) on every
token, so the scan finds a candidate. Zeroing it moves a random model's predictions too little to pass
the screen; `--min-effect 0` sends it to the perplexity verification anyway (a 262k-row head over the
verification window), the work a scan of a real model with a super weight does."""
CARRIER, CARRIER_VALUE, TRIGGER, SUPER_VALUE = 7, 1.0, 1.0, 8.0

# -- Gemma-3's vocabulary layout ------------------------------------------------

HEAD_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", *[f"<unused{i}>" for i in range(99)], "<start_of_turn>", "<end_of_turn>"]
"""Ids 0-106, as in Gemma-3 (<unused0> is id 6, <start_of_turn> 105)."""
HTML = [f"<{t}>" for t in "table caption thead tbody tfoot tr th td h1 h2 h3 h4 h5 h6 p div span br hr ul ol li b i u em strong blockquote code pre sub sup a img".split()]
USER_DEFINED = ["\n" * n for n in range(1, 32)] + [" " * n for n in range(2, 32)] + HTML + [t.replace("<", "</") for t in HTML]
"""Plain (non-special) added tokens, matched whole in raw text: Gemma's newline runs, space runs (stored
with real spaces, as in llama.cpp's Gemma files) and HTML tags."""
BYTES = [f"<0x{b:02X}>" for b in range(256)]
TAIL_SPECIAL = ["<start_of_image>", "<end_of_image>", *[f"<unused{i}>" for i in range(99, 6242)]]
"""Ids 255,999-262,143 (<unused6241> is the last id, 262,143)."""
NORMAL_COUNT = VOCAB - len(HEAD_SPECIAL) - len(USER_DEFINED) - len(BYTES) - len(TAIL_SPECIAL)

LATIN = "abcdefghijklmnopqrstuvwxyz"
SCRIPTS = {
    "cyrillic": ("абвгдежзийклмнопрстуфхцчшщ", "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩ"),
    "greek": ("αβγδεζηθικλμνξοπρστυφχψωϊϋ", "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩΪΫ"),
    "armenian": ("".join(chr(0x561 + i) for i in range(26)), "".join(chr(0x531 + i) for i in range(26))),
}


def training_text() -> list[str]:
    """The Wikipedia fixture's lines, then the same lines letter-for-letter in three other scripts."""
    from fetch import wiki_text

    lines = [line for line in wiki_text().split("\n") if line.strip()]
    out = list(lines)
    for lower, upper in SCRIPTS.values():
        table = str.maketrans(LATIN + LATIN.upper(), lower + upper)
        out += [line.translate(table) for line in lines]
    return out


def gemma_tokenizer():
    """A Gemma-3-style tokenizer.json pipeline (as transformers' GemmaTokenizer builds it) over a trained vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # SentencePiece splits words before "▁" and between scripts/punctuation and letters; the trainer sees the same pieces.
    trainee = Tokenizer(models.BPE())
    trainee.normalizer = normalizers.Replace(" ", "\u2581")
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\u2581", behavior="merged_with_next"), pre_tokenizers.Split(Regex(r"[\p{P}\p{N}]"), behavior="isolated")]
    )
    trainee.train_from_iterator(training_text(), trainers.BpeTrainer(vocab_size=NORMAL_COUNT, show_progress=False, max_token_length=24))
    trained = json.loads(trainee.to_str())["model"]
    normal = sorted(trained["vocab"], key=trained["vocab"].get)
    if len(normal) != NORMAL_COUNT:
        raise SystemExit(f"the trainer gave {len(normal)} tokens, not {NORMAL_COUNT}: the text ran out of merges")
    tokens = HEAD_SPECIAL + USER_DEFINED + BYTES + normal + TAIL_SPECIAL
    assert len(tokens) == VOCAB and len(set(tokens)) == VOCAB, "token texts must be distinct"
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HEAD_SPECIAL + TAIL_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    return tok


def write_model(hf: Path) -> float:
    """The HF directory (reused when its stamp matches); the seconds it took."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from swtool.formats.atomic import atomic_output

    stamp = {"config": GEMMA3_270M, "planted": PLANTED, "carrier": [CARRIER, CARRIER_VALUE, TRIGGER, SUPER_VALUE], "tokenizer": "gemma3-wiki4scripts-v1", "seed": 0}
    marker = hf / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
        return 0.0
    start = time.perf_counter()
    with atomic_output(hf, directory=True, force=True) as temp:
        torch.manual_seed(0)
        config = Gemma3TextConfig(**GEMMA3_270M)
        config.architectures = ["Gemma3ForCausalLM"]
        model = Gemma3ForCausalLM(config).eval()
        layer, row, col = PLANTED
        with torch.no_grad():
            model.model.embed_tokens.weight[:, CARRIER] = CARRIER_VALUE
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[col, CARRIER] = TRIGGER
            mlp.up_proj.weight[col, CARRIER] = TRIGGER
            mlp.down_proj.weight[row, col] = SUPER_VALUE
        model.to(torch.bfloat16).save_pretrained(temp)
        del model
        gemma_tokenizer().save(str(temp / "tokenizer.json"))
        (temp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        }, indent=2) + "\n")
        (temp / "bench.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return time.perf_counter() - start


def swtool_argv(tree: Path, *args: str | Path) -> list[str]:
    """The CLI of the swtool package in `tree` (PYTHONPATH; the `swtool` script may be another tree's editable
    install, and -P keeps `python -c` from importing the package of the current directory first)."""
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-c", "from swtool.cli import main; main()", *map(str, args)]


# -- the file's tokenizer keys ----------------------------------------------------


def check_metadata(gguf_path: Path) -> list[str]:
    """Differences from what llama.cpp's Gemma-3 converter (`_set_vocab_sentencepiece`, add_space_prefix False,
    SpecialVocab from tokenizer_config.json) writes for this vocabulary; prints the keys."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokens, scores, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type")
    kinds = {k: types.count(k) for k in sorted(set(types))}
    print(f"  tokenizer.ggml.model {value('tokenizer.ggml.model')!r}, pre {value('tokenizer.ggml.pre')!r}, "
          f"{len(tokens)} tokens, {len(scores)} scores, token types {kinds} (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)")
    ids = {k: value(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_space_prefix")}
    print(f"  {ids}")
    problems = []
    expect = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    problems += [f"{k} = {value(k)!r}, llama.cpp writes {v!r}" for k, v in expect.items() if value(k) != v]
    if not (len(tokens) == len(scores) == len(types) == VOCAB):
        problems.append(f"array lengths {len(tokens)}/{len(scores)}/{len(types)}, expected {VOCAB}")
    want = {3: len(HEAD_SPECIAL) + len(TAIL_SPECIAL) - 1, 2: 1, 4: len(USER_DEFINED), 6: 256, 1: NORMAL_COUNT}
    problems += [f"{n} tokens of type {k}, expected {want[k]}" for k, n in kinds.items() if want.get(k) != n]
    if tokens[:3] != ["<pad>", "<eos>", "<bos>"] or tokens[105] != "<start_of_turn>" or tokens[-1] != "<unused6241>":
        problems.append("special tokens are not at Gemma-3's ids")
    return problems


# -- tokenizer build alone ---------------------------------------------------------

TOKENIZER_CHILD = r"""
import json, sys, time
from pathlib import Path
import swtool
try:  # this tree
    from swtool.formats.open import open_checkpoint
    from swtool.formats.gguf.tokenizer import _spm_merges
    from swtool.model.tokenizer import load_tokenizer
except ImportError:  # d20e91e's layout
    from swtool.checkpoint import open_checkpoint
    from swtool.tokenizer import _spm_merges, load_tokenizer
clock = time.process_time
start = clock()
checkpoint = open_checkpoint(Path(sys.argv[1]))
opened = clock()
tokenizer = load_tokenizer(checkpoint)
built = clock()
ids = tokenizer.encode(sys.argv[2]).ids
encoded = clock()
sample = tokenizer.encode(sys.argv[3]).ids
meta = checkpoint.meta
merging = clock()
_spm_merges(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"])
print(json.dumps({"swtool": swtool.__file__, "open_s": opened - start, "tokenizer_s": built - opened,
                  "encode_s": encoded - built, "merges_s": clock() - merging, "ids": ids, "sample": sample}))
"""


def sample_text() -> str:
    """Text beyond the prompt: Wikipedia in two scripts, rare characters (byte fallback), added tokens."""
    from fetch import wiki_text

    text = wiki_text()[300_000:302_000]
    lower, upper = SCRIPTS["cyrillic"]
    return text + text[:1000].translate(str.maketrans(LATIN + LATIN.upper(), lower + upper)) + " naïve 東京 \U0001F600\n\n  <table><td>x</td>"


def tokenizer_child(tree: Path, gguf_path: Path) -> dict:
    out = subprocess.run(["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-c", TOKENIZER_CHILD, str(gguf_path), PROMPT, sample_text()], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tokenizer child ({tree}) failed:\n{out.stderr[-3000:]}")
    doc = json.loads(out.stdout)
    if not doc["swtool"].startswith(str(tree)):
        raise SystemExit(f"{tree}: the child imported swtool from {doc['swtool']}")
    return doc


# -- the benchmark ------------------------------------------------------------------


def tree_label(tree: Path) -> str:
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return f"{commit or tree.name}{'+changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/swtool-bench/gemma3-270m"))
    parser.add_argument("--baseline", type=Path, action="append", required=True, help="a source tree of older code (e.g. a checkout of d20e91e); repeatable")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    trees = {f"old {tree_label(b.resolve())}": b.resolve() for b in args.baseline} | {f"new {tree_label(ROOT)}": ROOT}
    new = list(trees)[-1]
    hf, where = args.dir / "hf", args.dir / "gguf"
    gguf_path = where / "model-Q4_K_M.gguf"
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"# Gemma-3-270M shape, {VOCAB} tokens ({NORMAL_COUNT} trained), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    seconds = write_model(hf)
    print(f"  wrote {hf} in {seconds:.0f} s" if seconds else f"  reusing {hf}", flush=True)
    if not gguf_path.is_file() or gguf_path.stat().st_mtime < (hf / "bench.json").stat().st_mtime:
        where.mkdir(exist_ok=True)
        start = time.perf_counter()
        subprocess.run(swtool_argv(ROOT, "quantize", hf, "-o", gguf_path, "--type", "Q4_K_M", "--no-keep-super", "--force", "-q"), check=True)
        print(f"  swtool quantize -> {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
    problems = check_metadata(gguf_path)
    print("  tokenizer keys as llama.cpp's Gemma-3 converter writes them" if not problems else "  tokenizer keys differ: " + "; ".join(problems), flush=True)

    from tokenizers import Tokenizer

    hf_tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    reference, sample_reference = hf_tokenizer.encode(PROMPT).ids, hf_tokenizer.encode(sample_text()).ids
    print(f"  prompt {PROMPT!r}: HF tokenizer.json ids {reference}", flush=True)

    print("\n## tokenizer build alone (CPU seconds in a child per tree)", flush=True)
    builds: dict[str, list[dict]] = {label: [] for label in trees}
    for round_ in range(args.repeat):
        for label, source in list(trees.items())[:: 1 if round_ % 2 == 0 else -1]:
            doc = tokenizer_child(source, gguf_path)
            builds[label].append(doc)
            print(f"  {label}: open {doc['open_s']:.2f} s, tokenizer {doc['tokenizer_s']:.2f} s (of which merges {doc['merges_s']:.2f} s), encode {doc['encode_s'] * 1e3:.1f} ms", flush=True)

    print("\n## whole processes, page cache warm, /usr/bin/time", flush=True)
    subprocess.run(["cat", str(gguf_path)], stdout=subprocess.DEVNULL, check=True)
    plan = [(f"scan {label}", swtool_argv(source, "scan", gguf_path, "--json")) for label, source in trees.items()]
    plan.append((f"scan {new} --min-effect 0", swtool_argv(ROOT, "scan", gguf_path, "--json", "--min-effect", "0")))
    plan.append((TRANSFORMERS, [sys.executable, str(HERE / "transformers_scan.py"), str(gguf_path)]))
    runs: list[Run] = []
    for round_ in range(args.repeat):
        shift = round_ % len(plan)
        for tool, argv in plan[shift:] + plan[:shift]:
            runs.append(measure(tool, argv, where, "warm"))
    report(runs, builds, reference, sample_reference, [tool for tool, _ in plan], new)
    if args.json_out:
        args.json_out.write_text(json.dumps({"runs": [asdict(r) | {"output": None} for r in runs], "builds": builds}, indent=2) + "\n")


TRANSFORMERS = "transformers GGUF load + hooked forward"


def report(runs: list[Run], builds: dict[str, list[dict]], reference: list[int], sample_reference: list[int], order: list[str], new: str) -> None:
    by = {r.tool: r for r in medians(runs)}
    print("\n| run | median wall s | median CPU s | median peak RSS MB | load | wall s of each run | exit |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for tool in order:
        r = by[tool]
        print(f"| {tool} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.peak_rss_mb:.0f} | {r.load_before:.1f} | {' '.join(f'{w:.1f}' for w in r.walls or [])} | {r.status} |")
    ref, ours = by[TRANSFORMERS], by[f"scan {new}"]
    print()
    for tool in order[:-1]:
        r = by[tool]
        print(f"{tool} / transformers: wall {r.wall_s / ref.wall_s:.2f}x (target <= 0.2), CPU {r.cpu_s / ref.cpu_s:.2f}x, peak RSS {r.peak_rss_mb / ref.peak_rss_mb:.2f}x")
    for label in builds:
        if label != new:
            r = by[f"scan {label}"]
            print(f"scan {new} / scan {label}: wall {ours.wall_s / r.wall_s:.2f}x, CPU {ours.cpu_s / r.cpu_s:.2f}x, peak RSS {ours.peak_rss_mb / r.peak_rss_mb:.2f}x")
    med = {k: {f: statistics.median(d[f] for d in v) for f in ("open_s", "tokenizer_s", "merges_s")} for k, v in builds.items()}
    print("tokenizer build, median CPU s: " + "; ".join(
        f"{label} {m['tokenizer_s']:.2f} (merges alone {m['merges_s']:.2f}, opening the file {m['open_s']:.2f})" for label, m in med.items()))

    ids = {"HF tokenizer.json": reference} | {f"swtool {label}": docs[0]["ids"] for label, docs in builds.items()}
    if ref.status == 0:
        ids["transformers GGUF"] = json.loads(ref.output)["ids"]
    same = all(v == reference for v in ids.values())
    print(f"prompt ids {'IDENTICAL' if same else 'DIFFER'}: " + "; ".join(f"{k} {v}" for k, v in ids.items()))
    agree = all(doc["sample"] == sample_reference for docs in builds.values() for doc in docs)
    print(f"{len(sample_text())}-character sample ({len(sample_reference)} tokens by the HF tokenizer.json): every tree's swtool "
          f"{'IDENTICAL to it' if agree else 'DIFFERS from it'}")
    for tool in order[:-1]:
        r = by[tool]
        if r.status == 0:
            doc = json.loads(r.output)
            found = [(c["layer"], c["row"], c["col"]) for c in doc["candidates"]]
            verified = sum(c.get("ppl_ratio") is not None for c in doc["candidates"])
            print(f"{tool}: {doc['tokens']} prompt tokens, candidates {found} ({verified} verified by perplexity), super weights "
                  f"{[(c['layer'], c['row'], c['col']) for c in doc['super_weights']]}; planted {PLANTED}")
    if ref.status == 0:
        layer = json.loads(ref.output)["layers"][PLANTED[0]]
        print(f"transformers hooks, layer {PLANTED[0]}: down_proj input max {layer['in_max']:.0f} in channel {layer['in_channel']}, output max {layer['out_max']:.0f} in channel {layer['out_channel']}")


if __name__ == "__main__":
    main()
