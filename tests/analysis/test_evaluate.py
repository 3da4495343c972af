"""swtool eval: streamed perplexity against transformers, windows, the head streamed in chunks, restore SA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import swtool.model.nll as nll_mod
import swtool.model.stream as stream_mod
from swtool.ablation import EditPlan
from swtool.cli import app
from swtool.errors import SwtoolError
from swtool.evaluate import Options, cut_windows, evaluate, perplexity, restore_hook
from swtool.formats.base import Held
from swtool.formats.open import open_checkpoint

SUPER = (1, 5, 7)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny random llama with a planted super weight at layer 1, [5, 7], and the transformers model."""
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("planted")
    model = tiny.build("llama", directory)
    tiny.plant(model, directory, [SUPER])
    return directory, model


def reference_nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean())


def test_matches_transformers_tightly(planted):
    directory, model = planted
    windows = torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(0))
    ours = perplexity(open_checkpoint(directory), windows, batch=2)
    assert ours == pytest.approx(reference_nll(model, windows), abs=2e-5)


def test_chunked_head_and_disk_buffer_change_nothing(planted, monkeypatch):
    directory, _ = planted
    checkpoint = open_checkpoint(directory)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    plain = perplexity(checkpoint, windows, batch=3)
    monkeypatch.setattr(stream_mod, "HEAD_CHUNK_ROWS", 7)  # 300-token vocabulary in 43 chunks, the last partial
    monkeypatch.setattr(nll_mod, "HEAD_CHUNK_ROWS", 7)
    monkeypatch.setattr(nll_mod, "LOGIT_BUDGET", 1)  # one window per head matmul
    chunked = perplexity(checkpoint, windows, batch=2, memory_limit=0)  # hidden states memory-mapped from a file
    assert chunked == pytest.approx(plain, abs=1e-5)


def test_cut_windows_drops_the_tail_and_refuses_short_text():
    windows = cut_windows(list(range(10)), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(SwtoolError, match="fewer than one window"):
        cut_windows([1, 2, 3], 4)


def test_evaluate_caps_ctx_and_limits_windows(planted, tmp_path):
    directory, model = planted
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)  # 1800 byte tokens
    result = evaluate(open_checkpoint(directory), text, ctx=4096, max_windows=2)
    assert (result.ctx, result.windows, result.tokens) == (256, 2, 1800)  # ctx capped at max_position_embeddings
    from swtool.model.tokenizer import load_tokenizer

    ids = torch.tensor(load_tokenizer(open_checkpoint(directory)).encode(text.read_text()).ids[:512]).view(2, 256)
    assert result.nll == pytest.approx(reference_nll(model, ids), abs=2e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll))


def test_restore_hook_puts_back_only_the_spike():
    held = Held("w", 1, 2)
    hook = restore_hook(EditPlan((held,), zero_super=True), {held: 10.0}, {"w": 3})
    x = torch.full((1, 4, 5), 0.5)
    x[0, 2, 2] = 500.0  # the token carrying the super activation
    y = torch.full((1, 4, 3), 0.1)
    out = hook(3, x, y)
    assert out[0, 2, 1] == pytest.approx(0.1 + 5000.0)
    assert torch.equal(out[0, [0, 1, 3], 1], y[0, [0, 1, 3], 1])  # no spike there: left zeroed
    assert hook(2, x, y) is None


def test_prune_super_and_restore_on_planted_model(planted):
    directory, _ = planted
    checkpoint = open_checkpoint(directory)
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    supers = (Held("model.layers.1.mlp.down_proj.weight", 5, 7),)
    original = perplexity(checkpoint, windows)
    pruned = perplexity(checkpoint, windows, Options(EditPlan(supers, zero_super=True)))
    restored = perplexity(checkpoint, windows, Options(EditPlan(supers, zero_super=True), restore_super_act=True))
    assert abs(pruned - original) > 1e-3
    assert abs(restored - original) < abs(pruned - original)
    with pytest.raises(SwtoolError, match="give both"):
        Options(EditPlan(supers), restore_super_act=True)


def test_cli_eval_json(planted, tmp_path):
    directory, _ = planted
    text = tmp_path / "text.txt"
    text.write_text("Hello world, hello swtool. " * 30)
    result = CliRunner().invoke(app, ["eval", str(directory), "--text", str(text), "--ctx", "64", "--max-windows", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"model", "text", "tokens", "windows", "ctx", "nll", "ppl"} <= set(doc)
    assert (doc["windows"], doc["ctx"], doc["tokens"]) == (3, 64, 810)
    assert doc["ppl"] == pytest.approx(math.exp(doc["nll"]))


def test_cli_eval_user_errors(planted, tmp_path):
    directory, _ = planted
    text = tmp_path / "short.txt"
    text.write_text("too short")
    result = CliRunner().invoke(app, ["eval", str(directory), "--text", str(text), "--ctx", "64"])
    assert result.exit_code == 2 and "fewer than one window" in result.output
    result = CliRunner().invoke(app, ["eval", str(directory), "--text", str(text), "--keep-super-act"])
    assert result.exit_code == 2 and "--a-bits" in result.output


def test_smollm2_matches_transformers(smollm2_hf, wiki_text):
    """The real model (fp16 weights, fp32 compute): streamed perplexity within 0.5 % of transformers' on the same windows."""
    import transformers

    checkpoint = open_checkpoint(smollm2_hf)
    from swtool.model.tokenizer import load_tokenizer

    ids = load_tokenizer(checkpoint).encode(wiki_text[:20000]).ids
    windows = cut_windows(ids, 128)[:2]
    ours = perplexity(checkpoint, windows, batch=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    reference = reference_nll(model, windows)
    assert math.exp(ours) == pytest.approx(math.exp(reference), rel=0.005)
    assert 5 < math.exp(ours) < 60  # a sensible English perplexity, not a broken model


def test_cli_eval_ablation_with_piped_super(planted, tmp_path):
    directory, _ = planted
    text = tmp_path / "text.txt"
    text.write_text("Hello world, hello swtool. " * 30)
    scan = json.dumps({"super_weights": [{"layer": 1, "tensor": "model.layers.1.mlp.down_proj.weight", "row": 5, "col": 7}]})
    base = ["eval", str(directory), "--text", str(text), "--ctx", "64", "--max-windows", "2", "--json"]
    plain = json.loads(CliRunner().invoke(app, base).stdout)
    pruned = CliRunner().invoke(app, [*base, "--zero-super", "--super", "-"], input=scan)
    assert pruned.exit_code == 0, pruned.output
    doc = json.loads(pruned.stdout)
    assert doc["settings"]["zero_super"] and doc["settings"]["super_weights"] == [["model.layers.1.mlp.down_proj.weight", 5, 7]]
    assert doc["nll"] != plain["nll"]


def test_eval_reads_a_quantized_directory(planted, tmp_path):
    """swtool's own quantized output is evaluated tensor by tensor, dequantized on the fly."""
    directory, _ = planted
    quantized = tmp_path / "q8"
    result = CliRunner().invoke(app, ["quantize", str(directory), "-o", str(quantized), "--bits", "8", "--no-keep-super", "-q"])
    assert result.exit_code == 0, result.output
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    original = perplexity(open_checkpoint(directory), windows)
    rounded = perplexity(open_checkpoint(quantized), windows)
    assert rounded != original and rounded == pytest.approx(original, abs=0.1)  # 8-bit: close, not equal


def test_cli_smoothquant_alpha_is_optional(planted, tmp_path):
    """`--smoothquant` alone is alpha 0.85 wherever it stands; `--smoothquant 0.5` and `=0.5` still give 0.5."""
    from swtool.cli import with_optional_values

    directory, _ = planted
    text = tmp_path / "text.txt"
    text.write_text("Hello world, hello swtool. " * 60)
    common = ["--text", str(text), "--ctx", "64", "--max-windows", "2", "--calibration-windows", "2", "--json"]
    alphas = {}
    for args in (
        ["eval", str(directory), *common, "--smoothquant"],  # last argument
        ["eval", "--smoothquant", str(directory), *common],  # before MODEL
        ["eval", str(directory), "--smoothquant", *common],  # before another option
        ["eval", str(directory), *common, "--smoothquant", "0.5"],
        ["eval", str(directory), *common, "--smoothquant=0.5"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        doc = json.loads(result.stdout)
        alphas.setdefault(doc["settings"]["smoothquant"], set()).add(doc["ppl"])
    assert set(alphas) == {0.85, 0.5}
    assert all(len(ppls) == 1 for ppls in alphas.values())  # the same alpha, wherever the bare flag stands, the same result
    assert alphas[0.85] != alphas[0.5]
    assert with_optional_values(["--smoothquant", "--", "--smoothquant"], {"--smoothquant": "0.85"}) == ["--smoothquant", "0.85", "--", "--smoothquant"]
    result = CliRunner().invoke(app, ["eval", str(directory), *common, "--smoothquant", "1.5"])
    assert result.exit_code == 2 and "between 0 and 1" in result.output
