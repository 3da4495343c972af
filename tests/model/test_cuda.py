"""On a CUDA device the forward, the scan and eval agree with transformers and with the CPU.

Nothing in swtool needs a GPU, so these are skipped where torch sees none (as in
CI); they run on a GPU machine with the rest of the suite.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from swtool.cli import app
from swtool.detect import scan
from swtool.formats.open import open_checkpoint
from tests.helpers.families import FORWARD_CASES, FORWARD_IDS
from tests.helpers.tiny import build, plant, plant_controlling
from tests.helpers.transformers_reference import TOKENS, check_against_transformers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: these run on a GPU machine")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 products would differ from the CPU's by ~1e-3; swtool leaves the global switch as the user set it."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize(("family", "overrides"), FORWARD_CASES, ids=FORWARD_IDS)
def test_forward_on_cuda_matches_transformers(tmp_path, family, overrides):
    check_against_transformers(tmp_path, family, overrides, TOKENS, device="cuda")


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "mixtral"])
def test_scan_on_cuda_reports_what_the_cpu_reports(tmp_path, family):
    model = build(family, tmp_path, seed=1)
    expert = (1,) if family == "mixtral" else ()
    plant(model, tmp_path, [(1, 5, 17, *expert), (2, 30, 40, *expert)])
    cpu = scan(open_checkpoint(tmp_path))
    gpu = scan(open_checkpoint(tmp_path), device="cuda")
    assert [c.key for c in gpu.candidates] == [c.key for c in cpu.candidates]
    assert [c.key for c in gpu.super_weights] == [c.key for c in cpu.super_weights]
    assert cpu.verification["rows"] > 1  # candidates were verified on both devices (tiny models: not super weights)
    for ours, theirs in zip(gpu.candidates, cpu.candidates):
        assert ours.effect == pytest.approx(theirs.effect, rel=1e-3, abs=1e-4)
        assert ours.ppl_ratio == pytest.approx(theirs.ppl_ratio, rel=0.05, nan_ok=True)  # bf16 on either device
        assert ours.activation == pytest.approx(theirs.activation, rel=1e-4)
    for ours, theirs in zip(gpu.layers, cpu.layers):
        assert (ours.out_channel, ours.in_channel) == (theirs.out_channel, theirs.in_channel)
        assert ours.out_max == pytest.approx(theirs.out_max, rel=1e-4)


def test_cli_scan_and_eval_on_cuda(tmp_path):
    model = build("llama", tmp_path / "model", seed=1)
    plant_controlling(model, tmp_path / "model", 1, 5, 17)  # a weight the perplexity verdict accepts
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    found = json.loads(CliRunner().invoke(app, ["scan", str(tmp_path / "model"), "--json", "--device", "cuda"]).stdout)
    assert [(w["layer"], w["row"], w["col"]) for w in found["super_weights"]] == [(1, 5, 17)]
    results = {}
    for device in ("cpu", "cuda"):
        run = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--text", str(text), "--ctx", "64", "--max-windows", "3", "--json", "--device", device])
        assert run.exit_code == 0, run.output
        results[device] = json.loads(run.stdout)
    assert results["cuda"]["ppl"] == pytest.approx(results["cpu"]["ppl"], rel=1e-4)
