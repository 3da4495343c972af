"""The issue's acceptance run on the real model: SmolLM2 -> 4-bit group-64 compressed-tensors -> transformers on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import swtool
from swtool.cli import app

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


@pytest.mark.slow
def test_smollm2_compressed_tensors_runs_in_transformers(smollm2_gguf, smollm2_hf, wiki_text, tmp_path):
    pytest.importorskip("compressed_tensors")
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    q = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(smollm2_gguf), "-o", str(q), "--format", "compressed-tensors", "--bits", "4", "--block", "64"])
    assert result.exit_code == 0, result.output
    assert f"{SUPER[0]}.weight[{SUPER[1]}, {SUPER[2]}]" in result.output and "kept unquantized" in result.output
    config = json.loads((q / "config.json").read_text())["quantization_config"]
    assert SUPER[0] in config["ignore"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"]  # the format's default: what transformers loads as it is
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()  # the done criterion, no extra option
    source = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    down = model.model.layers[11].mlp.down_proj.weight
    assert torch.equal(down, source.model.layers[11].mlp.down_proj.weight)  # the super weight's module, exact
    ids = torch.tensor([Tokenizer.from_file(str(q / "tokenizer.json")).encode(wiki_text[:20000]).ids[:1024]]).view(2, 512)
    quantized, reference = perplexity(model, ids), perplexity(source, ids)
    assert reference < quantized < 1.8 * reference  # symmetric 4-bit RTN at 64 costs ~60 % on this 135M model (README table: 25.2 vs 15.8)
    state = swtool.load_state_dict(q)
    name = "model.layers.5.self_attn.q_proj.weight"
    # transformers' default route rebuilds q * s in float32 (exact: small integers times fp16 scales);
    # swtool, as the package, in the scales' fp16: the same value once rounded to fp16
    assert torch.equal(state[name], model.get_parameter(name).half())
