"""The scan's verdict is perplexity's, and every command that relies on the scan uses it.

Two tiny llamas carry the same planted weight, layer 1 [5, 17], fed by an amplified
input channel, so both show a massive activation and zeroing the weight moves the
scan prompt's predictions by several nats (the old verdict, by prompt KL, called
both super weights):

- `controlled` (`tiny.plant_controlling`): the LM head reads the super activation's
  channel, so the model predicts English byte frequencies only with the weight.
  Zeroing it really breaks the model, which transformers confirms directly.
- `impostor` (`tiny.plant`): nothing reads the activation in particular; zeroing
  the weight does not raise perplexity, so it is a candidate, not a super weight.

scan, the directory comparison, edit --zero-super, eval --zero-super and quantize
--keep-super (which run the scan themselves) must all act on the controlled weight
and on nothing in the impostor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers.clirun import assert_user_error, invoke
from swtool.data.text import builtin_text
from swtool.detect import scan
from swtool.formats.open import open_checkpoint
from swtool.verify import window
from tests.helpers.tiny import build, plant, plant_controlling

SUPER = (1, 5, 17)
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def controlled(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("controlled")
    plant_controlling(build("llama", directory, seed=1), directory, *SUPER)
    return directory


@pytest.fixture(scope="module")
def impostor(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("impostor")
    plant(build("llama", directory, seed=1), directory, [SUPER])
    return directory


def transformers_ppl_ratio(directory: Path) -> float:
    """Perplexity of the verification window with W_down[5, 17] zeroed over the original's, by transformers in float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = window(open_checkpoint(directory), builtin_text(), "built-in")
    down = model.model.layers[SUPER[0]].mlp.down_proj.weight
    with torch.no_grad():
        before = float(model(tokens, labels=tokens).loss)
        down[SUPER[1], SUPER[2]] = 0
        after = float(model(tokens, labels=tokens).loss)
    return math.exp(after - before)


def test_a_weight_that_controls_the_model_is_a_super_weight(controlled):
    result = scan(open_checkpoint(controlled))
    assert [(c.layer, c.row, c.col) for c in result.super_weights] == [SUPER]
    ours = result.super_weights[0].ppl_ratio
    direct = transformers_ppl_ratio(controlled)
    assert direct >= 2 and ours >= 2
    assert math.log(ours) == pytest.approx(math.log(direct), rel=0.05)  # bf16 verification against the fp32 reference
    assert result.verification["rows"] == 2 and result.verification["dtype"] == "bfloat16"


def test_a_massive_activation_that_does_not_matter_is_only_a_candidate(impostor):
    result = scan(open_checkpoint(impostor))
    cand = next(c for c in result.candidates if (c.layer, c.row, c.col) == SUPER)
    assert cand.effect >= 1.0  # the prompt KL alone would have called it a super weight
    assert cand.ppl_ratio < 2 and not cand.is_super and result.super_weights == []
    assert transformers_ppl_ratio(impostor) < 2  # and directly: zeroing it does not break the model


def test_the_screen_decides_what_is_verified(controlled):
    result = scan(open_checkpoint(controlled), min_effect=1000.0)
    assert result.super_weights == [] and result.verification["rows"] == 0
    assert all(c.ppl_ratio != c.ppl_ratio and "min_effect" in c.unverified for c in result.candidates)


def quantized_super(directory: Path) -> list:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return [(w["tensor"], w["row"], w["col"]) for w in json.loads(f.metadata()["swtool.super"])]


@pytest.mark.parametrize("kind", ["controlled", "impostor"])
def test_every_command_that_relies_on_the_scan_uses_its_verdict(kind, request, tmp_path):
    model = request.getfixturevalue(kind)
    expected = [(DOWN, SUPER[1], SUPER[2])] if kind == "controlled" else []

    done = invoke("scan", model, "--json")
    assert done.exit_code == 0, done.output
    assert [(w["tensor"], w["row"], w["col"]) for w in json.loads(done.stdout)["super_weights"]] == expected

    entry = tmp_path / "mine.jsonl"
    entry.write_text(json.dumps({"model": "tiny-entry", "layer": SUPER[0], "row": SUPER[1], "col": SUPER[2]}) + "\n")
    compared = json.loads(invoke("scan", model, "--json", "--expect", "tiny-entry", "--directory-file", entry).stdout)["expected"]
    assert [e["status"] for e in compared] == (["found"] if expected else ["not found"])

    edited = invoke("edit", model, "-o", tmp_path / "edited", "--zero-super", "-q")
    text = tmp_path / "text.txt"
    text.write_text(builtin_text())
    evaluated = invoke("eval", model, "--text", text, "--ctx", "64", "--max-windows", "1", "--zero-super", "--json")
    quantized = invoke("quantize", model, "-o", tmp_path / "q", "--block", "64", "-q")
    assert quantized.exit_code == 0, quantized.output
    assert quantized_super(tmp_path / "q") == expected
    if expected:
        assert edited.exit_code == 0, edited.output
        before, after = open_checkpoint(model).load(DOWN), open_checkpoint(tmp_path / "edited").load(DOWN)
        assert float(after[SUPER[1], SUPER[2]]) == 0 and float(before[SUPER[1], SUPER[2]]) != 0
        after[SUPER[1], SUPER[2]] = before[SUPER[1], SUPER[2]]
        assert torch.equal(after, before)  # that weight and nothing else
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads(evaluated.stdout)["settings"]["super_weights"] == [list(w) for w in expected]
    else:
        assert_user_error(edited, "the scan found no super weight")
        assert_user_error(evaluated, "the scan found no super weight")


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read"),
        (b"\xff\xfe not utf-8 \x80", "not UTF-8"),
        (b"Too short.", "fewer than the 128"),
    ],
    ids=["missing", "not-utf8", "too-short"],
)
def test_a_bad_verify_text_is_one_line_and_status_2(controlled, tmp_path, content, match):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    assert_user_error(invoke("scan", controlled, "--verify-text", path), match)


def test_verify_tokens_sets_the_window(controlled):
    doc = json.loads(invoke("scan", controlled, "--json", "--verify-tokens", "64").stdout)
    assert doc["verification"]["tokens"] == 64 and [(w["layer"], w["row"], w["col"]) for w in doc["super_weights"]] == [SUPER]
    assert_user_error(invoke("scan", controlled, "--verify-tokens", "8"), "at least 16")


def test_verify_text_of_ones_own(controlled, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Plain words, written by the user, long enough to fill a verification window of bytes. " * 3)
    doc = json.loads(invoke("scan", controlled, "--json", "--verify-text", path).stdout)
    assert doc["verification"]["text"] == str(path) and doc["verification"]["tokens"] == 128
    assert [(w["layer"], w["row"], w["col"]) for w in doc["super_weights"]] == [SUPER]
