"""Perplexity of SmolLM2-135M after 4-bit RTN: plain vs super weights held out vs held out + --clip auto.

The source is the real model (the Q4_1 GGUF from fixtures/fetch.py, exported
once to an fp16 HF directory, which is also the baseline). For each block size
and variant the model is quantized with swtool's writer (the same code path as
`swtool quantize`), read back through `swtool.load_state_dict` (dequantized,
super weights restored), loaded into transformers' LlamaForCausalLM (the
numerical reference) and evaluated on Wikipedia text (fixtures wiki_text):
non-overlapping windows of --ctx tokens, the first --windows of them.

    python bench/quant_quality.py [--windows 16] [--ctx 512] [--blocks 64,512,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

VARIANTS = {
    "plain RTN": dict(keep=False, clip="none"),
    "--keep-super": dict(keep=True, clip="none"),
    "--keep-super --clip auto": dict(keep=True, clip="auto"),
}


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch]
            logits = model(ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--blocks", default="64,512,4096,16384,65536,tensor")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "swtool-quant-quality")
    args = parser.parse_args()

    import transformers
    from fetch import smollm2_gguf, wiki_text
    from tokenizers import Tokenizer

    from swtool import load_state_dict
    from swtool.codecs.rtn import QuantSpec, parse_block, parse_clip
    from swtool.detect import scan
    from swtool.formats.hf.export import export_hf
    from swtool.formats.open import open_checkpoint
    from swtool.quantize import QuantizeJob, targets, write_safetensors
    from swtool.supers import from_scan

    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "smollm2-fp16"
    if not (source / "config.json").is_file():
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        export_hf(open_checkpoint(smollm2_gguf()), source, torch.float16)
    checkpoint = open_checkpoint(source)
    held = from_scan(scan(checkpoint), checkpoint)
    print(f"super weights from swtool scan: {[(h.tensor, h.row, h.col) for h in held]}", file=sys.stderr)

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    ids = tokenizer.encode(wiki_text(limit_chars=args.windows * args.ctx * 8)).ids
    usable = len(ids) // args.ctx * args.ctx
    windows = torch.tensor(ids[:usable]).view(-1, args.ctx)[: args.windows]
    if windows.shape[0] < args.windows:
        raise SystemExit(f"only {windows.shape[0]} windows of text")

    config = transformers.AutoConfig.from_pretrained(source)
    model = transformers.LlamaForCausalLM(config).eval()

    def evaluate(directory: Path) -> float:
        state = dict(load_state_dict(directory, torch.float32))
        if config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state)
        return perplexity(model, windows)

    results = {"windows": args.windows, "ctx": args.ctx, "bits": args.bits, "super_weights": [(h.tensor, h.row, h.col) for h in held]}
    started = time.time()
    results["baseline"] = evaluate(source)
    print(f"fp16 source: ppl {results['baseline']:.3f}", file=sys.stderr)
    rows = []
    for block in args.blocks.split(","):
        row = {"block": block}
        for label, variant in VARIANTS.items():
            spec = QuantSpec(args.bits, parse_block(block), False, parse_clip(variant["clip"]))
            out = Path(tempfile.mkdtemp(prefix="q-", dir=args.work))
            try:
                job = QuantizeJob(checkpoint, spec, targets(checkpoint), held if variant["keep"] else [])
                write_safetensors(job, out)
                row[label] = evaluate(out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"block {block:>6} {label:<26} ppl {row[label]:8.3f}   ({time.time() - started:.0f} s)", file=sys.stderr)
        rows.append(row)
    results["rows"] = rows

    print(f"\n{args.bits}-bit asymmetric RTN, SmolLM2-135M-Instruct, Wikipedia: {args.windows} windows x {args.ctx} tokens; fp16 source ppl {results['baseline']:.2f}\n")
    print("| block | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for row in rows:
        print(f"| {row['block']} | " + " | ".join(f"{row[label]:.2f}" for label in VARIANTS) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
