"""swtool in pipelines: stdout carries only the data asked for, stderr only what a person needs, exit status tells.

Stream separation is checked in-process (fast); what only a real process shows
(a terminal, a shell pipeline, xargs, a closed pipe) runs the installed
`swtool` in real processes, as a shell or scheduler would.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.clirun import SWTOOL, assert_user_error, invoke, shell
from tests.helpers.synthetic import CONFIG, EFFECT, llama_dir, llama_tensors, plant


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """models/alpha and models/beta, each with one planted super weight; models/broken has no weights."""
    root = tmp_path_factory.mktemp("batch") / "models"
    for name, (layer, row, col) in {"alpha": (0, 5, 20), "beta": (0, 9, 3)}.items():
        tensors = llama_tensors(CONFIG)
        plant(tensors, layer, row, col, controls=True)  # so that the scan's perplexity verdict calls it a super weight
        llama_dir(root / name, tensors=tensors)
    llama_dir(root / "broken")
    (root / "broken" / "model.safetensors").unlink()
    return root


def test_several_models_json_lines_continue_past_a_bad_one(models):
    done = invoke("scan", models / "alpha", models / "broken", models / "beta", "--json", *EFFECT)
    assert done.exit_code == 2
    docs = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is one JSON document
    assert [Path(d["model"]).name for d in docs] == ["alpha", "beta"]
    assert [(w["layer"], w["row"], w["col"]) for d in docs for w in d["super_weights"]] == [(0, 5, 20), (0, 9, 3)]
    assert done.stderr.splitlines() == [f"swtool: error: {models / 'broken'}: no model.safetensors or model.safetensors.index.json"]


def test_json_and_quiet_keep_stderr_empty_on_success(models):
    as_json = invoke("scan", models / "alpha", "--json")
    assert as_json.exit_code == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["model"] == str(models / "alpha")
    quiet = invoke("scan", models / "alpha", "--quiet")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")


def test_the_table_goes_to_stdout_without_a_progress_bar_when_not_a_terminal(models):
    done = invoke("scan", models / "alpha", *EFFECT)
    assert done.exit_code == 0 and done.stderr == ""
    assert "Super weights" in done.stdout  # the result, for `> out.txt` and pipes
    assert "scan alpha" not in done.stdout + done.stderr  # the bar's label


def test_progress_bar_only_on_a_terminal(models):
    """With stderr on a pseudo-terminal the bar is drawn (and its label appears); stdout holds the result only."""
    leader, follower = pty.openpty()
    done = subprocess.run([*SWTOOL, "scan", str(models / "alpha")], stdout=subprocess.PIPE, stderr=follower, timeout=300)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert done.returncode == 0
    assert b"down_proj maxima per layer" in done.stdout and b"scan alpha" not in done.stdout
    assert b"scan alpha" in b"".join(chunks)


@pytest.mark.slow  # the default run takes the same find | xargs pattern with quantize (test_writing_commands.py)
def test_pipeline_through_a_real_shell(models):
    """The README's batch pattern: find models, scan them in parallel, summarise the JSON Lines."""
    summary = (
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    d = json.loads(line)\n"
        "    for w in d['super_weights']:\n"
        "        print(d['model'], w['tensor'], w['row'], w['col'])\n"
    )
    done = shell(
        f"find models -name config.json -printf '%h\\n' | grep -v broken | sort | xargs -P 2 -I{{}} swtool scan {{}} --json {' '.join(EFFECT)} "
        f"| python3 -c \"{summary}\" | sort",
        cwd=models.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "models/alpha model.layers.0.mlp.down_proj.weight 5 20",
        "models/beta model.layers.0.mlp.down_proj.weight 9 3",
    ]


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (the README's jq example is optional)")
def test_readme_jq_one_liner(models):
    done = shell(
        f"swtool scan models/alpha models/beta --json {' '.join(EFFECT)} "
        "| jq -r '.model as $m | .super_weights[] | [$m, .tensor, .row, .col] | @tsv'",
        cwd=models.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "models/alpha\tmodel.layers.0.mlp.down_proj.weight\t5\t20",
        "models/beta\tmodel.layers.0.mlp.down_proj.weight\t9\t3",
    ]


def test_a_closed_pipe_stops_quietly(models):
    """`swtool scan A B --json | head -c 1`: no traceback, no 'Exception ignored', the status of a SIGPIPE'd tool."""
    done = shell("swtool scan models/alpha models/beta --json | head -c 1; echo \" ${PIPESTATUS[0]}\"", cwd=models.parent)
    assert done.stdout == "{ 141\n"
    assert done.stderr == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("argv", [["--version"], ["directory", "--json"]], ids=["eager option", "command"])
def test_output_on_a_full_disk_is_one_line_and_status_1(argv):
    """Whether the write fails inside a command or in the last flush before the process leaves, no traceback."""
    for unbuffered in ("1", ""):  # print fails at once, or only at the final flush
        with open("/dev/full", "w") as full:
            done = subprocess.run([*SWTOOL, *argv], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "No space left" in done.stderr and "Traceback" not in done.stderr


def test_option_errors_are_one_line_too(models, tmp_path):
    """What the option parser refuses reads like every other user error (the console script wraps typer)."""
    done = subprocess.run([*SWTOOL, "eval", str(models / "alpha"), "--text", str(tmp_path / "t"), "--ctx", "abc"], capture_output=True, text=True, timeout=120)
    assert_user_error(done, r"Invalid value for '--ctx'.*\(see swtool eval --help\)")
    done = subprocess.run([*SWTOOL, "quantize", str(models / "alpha"), "-o", str(tmp_path / "q"), "--bits", "abc"], capture_output=True, text=True, timeout=120)
    assert_user_error(done, r"--bits 'abc': expected 8, 4, 3 or 2")  # --bits also takes fp8, so swtool reads it itself
    assert not (tmp_path / "q").exists()
