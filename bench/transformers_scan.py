"""The reference way to find super activations: load the model with transformers, hook every down_proj.

Run as a child process by bench/scan_bench.py so that its wall time and peak RSS
can be measured by the operating system:

    python bench/transformers_scan.py MODEL_DIR --dtype fp32 [--prompt TEXT]
    python bench/transformers_scan.py MODEL.gguf --dtype fp32   (transformers' own GGUF loading: dequantize, convert the tokenizer)

It prints one JSON document: per layer the largest |down_proj input| and
|output| with their channels, the same figures `swtool scan` reports in pass 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--prompt", default="Apple Inc. is a worldwide tech company.")
    args = parser.parse_args()

    if args.model.suffix == ".gguf":
        where = {"pretrained_model_name_or_path": args.model.parent, "gguf_file": args.model.name}
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=DTYPES[args.dtype]).eval()
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.model / "tokenizer.json"))
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    layers: list[dict] = []

    def hook(index: int):
        def record(_module, inputs, output):
            x, y = inputs[0][0].abs(), output[0].abs()
            x_token, x_channel = divmod(int(x.argmax()), x.shape[1])
            y_token, y_channel = divmod(int(y.argmax()), y.shape[1])
            layers.append(
                {
                    "layer": index,
                    "in_max": float(x.max()),
                    "in_channel": x_channel,
                    "out_max": float(y.max()),
                    "out_channel": y_channel,
                    "out_median": float(y.float().median()),
                }
            )

        return record

    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(hook(index))
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(json.dumps({"tokens": int(ids.shape[1]), "ids": ids[0].tolist(), "layers": layers, "logits_finite": bool(torch.isfinite(logits).all())}))


if __name__ == "__main__":
    main()
