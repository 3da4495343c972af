"""The super weight directory: packaged data, local files built from scan output, and --expect."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from swtool import directory
from swtool.cli import app
from swtool.errors import SwtoolError
from tests.helpers.tiny import build, plant_controlling

# The list, transcribed independently of swtool/data/directory.json: (model, layer, row, col, source).
PUBLISHED = [
    ("Llama-7B", 2, 3968, 7003, "paper"),
    ("Llama-13B", 2, 2231, 2278, "paper"),
    ("Llama-13B", 2, 2231, 6939, "paper"),
    ("Llama-30B", 3, 5633, 12817, "paper"),
    ("Llama-30B", 3, 5633, 17439, "paper"),
    ("Llama-30B", 10, 5633, 14386, "paper"),
    ("Llama-2-7B", 1, 2533, 7890, "paper"),
    ("Llama-2-13B", 3, 4743, 7678, "paper"),
    ("Mistral-7B-v0.1", 1, 2070, 7310, "paper"),
    ("OLMo-1B-0724-hf", 1, 1764, 1710, "paper"),
    ("OLMo-1B-0724-hf", 2, 1764, 8041, "paper"),
    ("OLMo-7B-0724-hf", 1, 269, 7467, "paper"),
    ("OLMo-7B-0724-hf", 2, 269, 8275, "paper"),
    ("OLMo-7B-0724-hf", 7, 269, 453, "paper"),
    ("OLMo-7B-0724-hf", 24, 269, 2300, "paper"),
    ("Phi-3-mini-4k-instruct", 2, 525, 808, "paper"),
    ("Phi-3-mini-4k-instruct", 2, 1693, 808, "paper"),
    ("Phi-3-mini-4k-instruct", 2, 1113, 808, "paper"),
    ("Phi-3-mini-4k-instruct", 4, 525, 2723, "paper"),
    ("Phi-3-mini-4k-instruct", 4, 1113, 2723, "paper"),
    ("Phi-3-mini-4k-instruct", 4, 1693, 2723, "paper"),
    ("Meta-Llama-3-8B", 1, 788, 2427, "authors' code"),
    ("Meta-Llama-3-8B", 1, 1384, 2427, "authors' code"),
    ("Meta-Llama-3-8B", 1, 4062, 2427, "authors' code"),
]


def swtool(*args: str):
    """Run the CLI in-process (stdout and stderr kept apart); `.returncode` like a finished process."""
    result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def test_packaged_directory_is_the_published_list():
    entries = directory.packaged().entries
    assert [(e.model, e.layer, e.row, e.col, e.source) for e in entries] == PUBLISHED
    assert all(e.tensor == f"model.layers.{e.layer}.mlp.down_proj.weight" for e in entries)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("meta-llama/Llama-2-7b-hf", "Llama-2-7B"),
        ("/models/Mistral-7B-v0.1", "Mistral-7B-v0.1"),
        ("Meta Llama 3 8B", "Meta-Llama-3-8B"),  # a GGUF general.name
        ("huggyllama/llama-7b", "Llama-7B"),
        ("meta-llama/Llama-2-7b-chat-hf", None),  # a different model is not a near match
        ("", None),
    ],
)
def test_identify_by_name(name, model):
    assert directory.packaged().identify([name]) == model


def test_compare_says_found_elsewhere_and_not_found():
    entries = directory.packaged().for_model("Llama-13B")
    found = [
        {"layer": 2, "row": 2231, "col": 2278, "expert": None},  # the first entry, exactly
        {"layer": 3, "row": 2231, "col": 100, "expert": None},  # same super activation channel as the second, elsewhere
    ]
    report = directory.compare(entries, found)
    assert [r["status"] for r in report] == ["found", "found elsewhere"]
    assert report[1]["found_at"][0]["layer"] == 3
    assert [r["status"] for r in directory.compare(entries, [])] == ["not found", "not found"]


def test_unknown_expect_is_a_user_error(tmp_path):
    with pytest.raises(SwtoolError, match="not in the super weight directory"):
        directory.expected(directory.packaged(), [], [], "Llama-99B")
    result = swtool("scan", str(tmp_path), "--expect", "Llama-99B")  # refused before the model is even opened
    assert result.returncode == 2 and "Llama-99B" in result.stderr


def test_directory_command_json_and_table():
    result = swtool("directory", "--json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert len(doc["entries"]) == len(PUBLISHED) and "paper" in doc["sources"]
    table = swtool("directory")
    assert table.returncode == 0 and table.stderr == "" and "OLMo-7B-0724-hf" in table.stdout and "3968" in table.stdout


def test_scan_output_appended_to_a_local_file_feeds_directory_and_expect(tmp_path):
    model_dir = tmp_path / "tiny-planted"
    plant_controlling(build("llama", model_dir, seed=1), model_dir, 1, 5, 17)  # a weight the perplexity verdict accepts
    mine = tmp_path / "mine.jsonl"
    first = swtool("scan", str(model_dir), "--json")
    assert first.returncode == 0
    assert "expected" not in json.loads(first.stdout)  # an unknown model: nothing to compare with
    mine.write_text(first.stdout + json.dumps({"model": "Other-1B", "layer": 0, "row": 1, "col": 2}) + "\n")

    listed = json.loads(swtool("directory", "--json", "--file", str(mine)).stdout)["entries"]
    assert len(listed) == len(PUBLISHED) + 2
    assert (listed[-2]["model"], listed[-2]["layer"], listed[-2]["row"], listed[-2]["col"]) == ("tiny-planted", 1, 5, 17)
    assert listed[-1]["model"] == "Other-1B"

    # The same model scanned again is identified by name and its entry is found.
    again = json.loads(swtool("scan", str(model_dir), "--json", "--directory-file", str(mine)).stdout)
    assert [(e["layer"], e["row"], e["col"], e["status"]) for e in again["expected"]] == [(1, 5, 17, "found")]
    # A model with the super weight moved to another column: the entry's row is found elsewhere.
    moved = tmp_path / "moved"
    plant_controlling(build("llama", moved, seed=1), moved, 1, 5, 40)
    report = json.loads(swtool("scan", str(moved), "--json", "--directory-file", str(mine), "--expect", "tiny-planted").stdout)["expected"]
    assert [(r["status"], r["found_at"][0]["col"]) for r in report] == [("found elsewhere", 40)]
    # Against a published model whose coordinates a tiny model cannot hold: not found.
    report = json.loads(swtool("scan", str(moved), "--json", "--expect", "Llama-7B").stdout)["expected"]
    assert [r["status"] for r in report] == ["not found"]


def test_bad_local_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "x", "layer": 1}\n')
    result = swtool("directory", "--file", str(bad))
    assert result.returncode == 2 and "bad.jsonl:1" in result.stderr
