"""The real model end to end: quantize the SmolLM2 GGUF (scan included), dequantize, load with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from swtool.cli import app


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


@pytest.mark.slow
def test_smollm2_gguf_quantize_dequantize(smollm2_gguf, wiki_text, tmp_path):
    import transformers
    from tokenizers import Tokenizer

    q, out = tmp_path / "q", tmp_path / "deq"
    result = CliRunner().invoke(app, ["quantize", str(smollm2_gguf), "-o", str(q), "--block", "64", "-q"])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(q / "model.safetensors"), "pt") as f:
        table = json.loads(f.metadata()["swtool.super"])
    assert [(t["tensor"], t["row"], t["col"]) for t in table] == [("model.layers.11.mlp.down_proj.weight", 507, 1229)]
    assert {"config.json", "tokenizer.json"} <= {p.name for p in q.iterdir()}
    assert CliRunner().invoke(app, ["dequantize", str(q), "-o", str(out), "--dtype", "fp32"]).exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.model.layers[11].mlp.down_proj.weight[507, 1229].item() == table[0]["value"]
    ids = torch.tensor([Tokenizer.from_file(str(out / "tokenizer.json")).encode(wiki_text[:20000]).ids[:1024]]).view(2, 512)
    quantized_ppl = perplexity(model, ids)
    with torch.no_grad():
        model.model.layers[11].mlp.down_proj.weight[507, 1229] = 0.0
    assert quantized_ppl < 40  # fp16 SmolLM2 is ~17 on this text; zeroing the super weight takes it past 100
    assert perplexity(model, ids) > 2 * quantized_ppl
