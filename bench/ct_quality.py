"""compressed-tensors output on SmolLM2: size on disk and perplexity per scheme, super weights' modules kept or not.

Each row: `swtool quantize GGUF -o OUT --format compressed-tensors ...` then `swtool eval OUT --text T
--ctx CTX --max-windows N --json` (swtool's streamed forward over the dequantized weights, read back
by swtool's compressed-tensors reader). `--transformers` adds, for the 4-bit group-64 output, the
perplexity transformers computes after AutoModelForCausalLM.from_pretrained on the same windows.

    python bench/ct_quality.py --windows 8 --ctx 512 [--transformers] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

ROWS = [
    ("int4 asym", ["--bits", "4", "--block", "64", "--asym"]),
    ("int4 asym", ["--bits", "4", "--block", "64", "--no-keep-super", "--asym"]),
    ("int4 sym", ["--bits", "4", "--block", "64", "--sym"]),
    ("int4 sym", ["--bits", "4", "--block", "64", "--sym", "--no-keep-super"]),
    ("int4 asym", ["--bits", "4", "--block", "32", "--asym"]),
    ("int4 asym", ["--bits", "4", "--block", "32", "--no-keep-super", "--asym"]),
    ("int4 asym", ["--bits", "4", "--block", "channel", "--asym"]),
    ("int4 asym", ["--bits", "4", "--block", "channel", "--no-keep-super", "--asym"]),
    ("int3 asym", ["--bits", "3", "--block", "64", "--asym"]),
    ("int8 sym", ["--bits", "8", "--block", "channel", "--sym"]),
    ("int8 asym", ["--bits", "8", "--block", "64", "--asym"]),
    ("fp8", ["--bits", "fp8"]),
    ("fp8", ["--bits", "fp8", "--no-keep-super"]),
]


def swtool(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "swtool.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"swtool {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6


def evaluate(model: Path, text: Path, ctx: int, windows: int) -> float:
    return json.loads(swtool("eval", str(model), "--text", str(text), "--ctx", str(ctx), "--max-windows", str(windows), "--json", "-q"))["ppl"]


def transformers_ppl(directory: Path, text: str, ctx: int, windows: int) -> float:
    """Perplexity transformers computes on the output as it loads it (asymmetric: dequantize=True, see the README)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    from tokenizers import Tokenizer

    quantized = json.loads((directory / "config.json").read_text()).get("quantization_config") is not None
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **extra)
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids
    nll, count = 0.0, 0
    for w in range(windows):
        window = torch.tensor([ids[w * ctx : (w + 1) * ctx]])
        with torch.no_grad():
            logits = model(window).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--transformers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from fetch import smollm2_gguf, wiki_text

    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_path = work / "wiki.txt"
        text = wiki_text(limit_chars=args.windows * args.ctx * 8)
        text_path.write_text(text)
        source = work / "source"
        swtool("dequantize", str(gguf), "-o", str(source), "--dtype", "fp16")
        results = [{"scheme": "fp16 (GGUF Q4_1 dequantized)", "options": [], "size_mb": size_mb(source), "ppl": evaluate(source, text_path, args.ctx, args.windows)}]
        if args.transformers:
            results[0]["transformers_ppl"] = transformers_ppl(source, text, args.ctx, args.windows)
        extra = f" (transformers: {results[0]['transformers_ppl']:.3f})" if args.transformers else ""
        print(f"| {results[0]['scheme']} | | | {results[0]['size_mb']:.1f} | {results[0]['ppl']:.3f}{extra} |", flush=True)
        for index, (scheme, options) in enumerate(ROWS):
            out = work / f"q{index}"
            swtool("quantize", str(gguf), "-o", str(out), "--format", "compressed-tensors", "-q", *options)
            row = {"scheme": scheme, "options": options, "size_mb": size_mb(out), "ppl": evaluate(out, text_path, args.ctx, args.windows)}
            if args.transformers and options == ["--bits", "4", "--block", "64"]:
                row["transformers_ppl"] = transformers_ppl(out, text, args.ctx, args.windows)
            results.append(row)
            block = options[options.index("--block") + 1] if "--block" in options else "channel"
            kept = "no" if "--no-keep-super" in options else "yes"
            extra = f" (transformers: {row['transformers_ppl']:.3f})" if "transformers_ppl" in row else ""
            print(f"| {scheme} | {block} | {kept} | {row['size_mb']:.1f} | {row['ppl']:.3f}{extra} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"ctx": args.ctx, "windows": args.windows, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
