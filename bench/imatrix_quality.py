"""Does an importance matrix help, and does swtool's data-free one (`swtool imatrix --builtin`) help as much?

SmolLM2's F16 GGUF (swtool's own HF -> GGUF export of the fixture model) is quantized at each
type with no imatrix, with the built-in-text imatrix, and with one made from the Wikipedia
fixture text; llama-perplexity scores every file on held-out Wikipedia text (a later part of the
fixture than the calibration part), same settings for every file.

    SWTOOL_LLAMA_CPP=<llama.cpp build/bin> python bench/imatrix_quality.py [--types Q4_K_M Q3_K_M Q2_K] [--chunks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

from fetch import smollm2_gguf, wiki_text  # noqa: E402

SWTOOL = [sys.executable, "-c", "from swtool.cli import main; main()"]


def run(*command: object) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))[:200]}: {(result.stdout + result.stderr)[-2000:]}")
    return result.stdout + result.stderr


def perplexity(binary: Path, model: Path, text: Path, ctx: int, chunks: int) -> float:
    output = run(binary / "llama-perplexity", "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", "2", "-b", ctx)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", output).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8, help="held-out chunks llama-perplexity scores")
    parser.add_argument("--calibration-chunks", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    binary = Path(os.environ["SWTOOL_LLAMA_CPP"])
    text = wiki_text()
    with tempfile.TemporaryDirectory(prefix="swtool-imatrix-quality-") as scratch:
        work = Path(scratch)
        calibration, held_out = work / "calibration.txt", work / "held_out.txt"
        calibration.write_text(text[:400_000])
        held_out.write_text(text[-200_000:])  # the fixture's last articles: never seen by the calibration
        run(*SWTOOL, "dequantize", smollm2_gguf(), "-o", work / "hf")
        f16 = work / "f16.gguf"
        run(*SWTOOL, "quantize", work / "hf", "-o", f16, "--type", "F16", "--no-keep-super", "-q")
        matrices = {"none": None, "built-in text": work / "builtin.gguf", "Wikipedia": work / "wiki.gguf"}
        run(*SWTOOL, "imatrix", f16, "--builtin", "-o", matrices["built-in text"], "--ctx", args.ctx, "-q")
        run(*SWTOOL, "imatrix", f16, "--text", calibration, "-o", matrices["Wikipedia"], "--ctx", args.ctx, "--chunks", args.calibration_chunks, "-q")
        rows = [{"type": "F16", "imatrix": "-", "ppl": perplexity(binary, f16, held_out, args.ctx, args.chunks), "mb": f16.stat().st_size / 1e6}]
        for type_name in args.types:
            for label, matrix in matrices.items():
                out = work / f"{type_name}-{label.split()[0]}.gguf"
                run(*SWTOOL, "quantize", f16, "-o", out, "--type", type_name, "--no-keep-super", "-q", *(["--imatrix", matrix] if matrix else []))
                rows.append({"type": type_name, "imatrix": label, "ppl": perplexity(binary, out, held_out, args.ctx, args.chunks), "mb": out.stat().st_size / 1e6})
                print(f"{type_name:8} {label:14} ppl {rows[-1]['ppl']:.3f}  {rows[-1]['mb']:.1f} MB", flush=True)
    print("\n| type | imatrix | perplexity (held-out Wikipedia) | size (MB) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['type']} | {row['imatrix']} | {row['ppl']:.3f} | {row['mb']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
