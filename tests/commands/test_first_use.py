"""What a new user meets: outputs refused before any work, formats named by the output, results on stdout,
a start without torch, and help that shows what to type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.clirun import SWTOOL, assert_user_error, invoke, snapshot, swtool
from tests.helpers.synthetic import CONFIG, llama_dir, llama_tensors, plant

import swtool.quantize as quantize_mod

SUPER = (0, 5, 20)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tensors = llama_tensors(CONFIG)
    plant(tensors, *SUPER)
    directory = tmp_path_factory.mktemp("src") / "model"
    llama_dir(directory, tensors=tensors)
    return directory


UNWRITABLE = [
    ("/sys/swtool-out", "permission denied"),  # sysfs: not even root may create files there
    ("/etc/hostname/out", "not a directory"),
    ("/proc/swtool-missing/out", "no such file or directory"),
]


@pytest.mark.parametrize("target, reason", UNWRITABLE)
@pytest.mark.parametrize("command", ["quantize", "dequantize", "edit", "imatrix"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(model, target, reason, command, monkeypatch):
    """Before opening the model, and before even reading it ahead and importing torch (`cli.start`)."""
    if not Path(target).parent.parent.exists():
        pytest.skip(f"{target}: no such system directory here")
    opened = []
    monkeypatch.setattr("swtool.formats.open._open", lambda path: opened.append(path))  # any work would open the model first
    monkeypatch.setattr("swtool.formats.open.prefetch", lambda path: opened.append(("read ahead", path)))
    args = {"quantize": ["--bits", "4"], "dequantize": [], "edit": ["--zero-super"], "imatrix": ["--builtin"]}[command]
    result = invoke(command, model, "-o", target, *args)
    assert_user_error(result, f"{target}: cannot write here \\({reason}")
    assert opened == []


def test_a_read_only_file_system_is_a_user_error(model, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert_user_error(invoke("quantize", model, "-o", mount / "q"), "read-only file system")
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_plot_target_is_checked_before_the_scan(model):
    pytest.importorskip("matplotlib")
    assert_user_error(invoke("scan", model, "--plot", "/sys/swtool.png"), "cannot write here")


def test_a_gguf_output_name_means_gguf(model, tmp_path):
    out = tmp_path / "out.gguf"
    result = invoke("quantize", model, "-o", out, "--no-keep-super", "-q")
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    before = snapshot(tmp_path)
    assert_user_error(invoke("quantize", model, "-o", tmp_path / "x.gguf", "--format", "safetensors"), "the name says gguf but --format is safetensors")
    assert snapshot(tmp_path) == before


def test_output_format_rules():
    assert quantize_mod.output_format(None, Path("a/b")) == "safetensors"
    assert quantize_mod.output_format(None, Path("m.GGUF")) == "gguf"
    assert quantize_mod.output_format("gguf", Path("m.bin")) == "gguf"


def test_results_go_to_stdout_as_plain_text(model):
    scan = swtool("scan", model)
    assert scan.returncode == 0, scan.stderr
    assert "down_proj maxima per layer" in scan.stdout and "\x1b[" not in scan.stdout  # the table, no colour codes
    listing = swtool("directory")
    assert listing.returncode == 0
    assert any("Llama" in line for line in listing.stdout.splitlines())  # `swtool directory | grep Llama`
    assert max(len(line) for line in listing.stdout.splitlines()) > 100  # not wrapped to an 80-column fake terminal
    assert listing.stderr == ""


CHEAP = [["--help"], ["--version"], ["directory"], ["scan", "/no/such/model"], ["quantize", "/no/such/model", "-o", "x"], ["scan", "--help"]]


@pytest.mark.parametrize("argv", CHEAP, ids=" ".join)
def test_cheap_answers_do_not_import_torch(argv):
    code = (
        "import sys\nfrom swtool.cli import app\n"
        f"try:\n    app({argv!r}, standalone_mode=False)\nexcept BaseException:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip().splitlines()[-1] == "False", result.stderr


@pytest.mark.parametrize("command", ["scan", "quantize", "dequantize", "edit", "eval", "directory"])
def test_help_shows_what_to_type(command):
    result = subprocess.run([*SWTOOL, command, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for python_name in ("<bool>", "<list[Path]>", "<path>", "<str>", "<int>", "<float>", "{model", "{MODEL"):
        assert python_name not in result.stdout, f"{command} --help shows {python_name}"
    assert "[OPTIONS]" in result.stdout


def test_scan_json_is_unchanged_on_stdout(model):
    result = swtool("scan", model, "--json")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert any(c["row"] == SUPER[1] and c["col"] == SUPER[2] for c in document["candidates"])
    assert result.stderr == ""
