"""The reference perplexity: transformers loads the model and computes the loss of the same windows `swtool eval` uses.

Run as a child process by bench/eval_memory.py so that its wall time and peak RSS can be
measured by the operating system:

    python bench/transformers_perplexity.py MODEL_DIR TEXT --ctx 512 --max-windows 2 [--dtype bf16]

What it does is what the transformers documentation's perplexity recipe does with
non-overlapping windows: tokenize the whole text, cut it into windows of `ctx` tokens (the
incomplete tail dropped, as swtool does), run the first `max-windows` in one batch with
`labels=input_ids` (the model shifts them, upcasts the logits to float32 and takes the
mean cross-entropy over every predicted token). It prints one JSON document with the
token count, the windows and the mean loss, to compare with `swtool eval --json`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = parser.parse_args()

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.model / "tokenizer.json"))
    ids = tokenizer(args.text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = min(len(ids) // args.ctx, args.max_windows)
    windows = ids[: count * args.ctx].view(count, args.ctx)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    with torch.inference_mode():
        nll = float(model(windows, labels=windows).loss)
    print(json.dumps({"tokens": len(ids), "windows": count, "ctx": args.ctx, "nll": nll, "ppl": math.exp(nll)}))


if __name__ == "__main__":
    main()
