"""Every command that writes (quantize, dequantize): deterministic, with provenance, never touching its input,
and leaving nothing behind when interrupted, when the disk fills, or when another run holds the same output.

Add each new writing command to WRITERS below (and to the pipeline tests) as it lands.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from swtool import __version__
from swtool.formats.open import open_checkpoint
from tests.helpers.clirun import SLOW_COMMAND, SWTOOL, assert_user_error, invoke, shell, snapshot
from tests.helpers.synthetic import CONFIG, EFFECT, llama_dir, llama_tensors, plant

SUPER = (0, 5, 20)
DOWN = f"model.layers.{SUPER[0]}.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tensors = llama_tensors(CONFIG)
    plant(tensors, *SUPER, controls=True)  # the scan | quantize pipeline below needs a real verdict
    directory = tmp_path_factory.mktemp("src") / "model"
    llama_dir(directory, tensors=tensors)
    return directory


@pytest.fixture(scope="module")
def super_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.json"
    path.write_text(json.dumps({"super_weights": [{"layer": SUPER[0], "tensor": DOWN, "row": SUPER[1], "col": SUPER[2]}]}))
    return path


@pytest.fixture(scope="module")
def quantized(model, super_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q4"
    result = invoke("quantize", model, "-o", out, "--super", super_json, "--block", "64", "-q")
    assert result.exit_code == 0, result.output
    return out


def quantize_args(model: Path, super_json: Path, out: Path) -> list[object]:
    return ["quantize", model, "-o", out, "--super", super_json, "--block", "64", "-q"]


def dequantize_args(quantized: Path, out: Path) -> list[object]:
    return ["dequantize", quantized, "-o", out, "--dtype", "fp16"]


WRITERS = {
    "quantize": lambda model, super_json, quantized, out: (quantize_args(model, super_json, out), [model, super_json]),
    "dequantize": lambda model, super_json, quantized, out: (dequantize_args(quantized, out), [quantized]),
    "edit": lambda model, super_json, quantized, out: (["edit", model, "-o", out, "--scale-super", "2", "--super", super_json, "-q"], [model, super_json]),
}
"""command -> (its arguments writing to out, the inputs it reads)."""


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def metadata(directory: Path) -> dict[str, str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("command", WRITERS)
def test_same_input_and_options_give_identical_bytes_and_the_input_is_untouched(command, model, super_json, quantized, tmp_path):
    args = {name: WRITERS[command](model, super_json, quantized, tmp_path / name) for name in ("a", "b")}
    before = snapshot(*args["a"][1])
    for name, (argv, _) in args.items():
        result = invoke(*argv)
        assert result.exit_code == 0, result.output
    assert snapshot(*args["a"][1]) == before
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(files(tmp_path / "a")) >= 3


@pytest.mark.parametrize("command", WRITERS)
def test_provenance_recorded(command, model, super_json, quantized, tmp_path):
    argv, inputs = WRITERS[command](model, super_json, quantized, tmp_path / "out")
    assert invoke(*argv).exit_code == 0
    meta = metadata(tmp_path / "out")
    assert meta["swtool.version"] == __version__ and meta["swtool.command"] == command
    assert json.loads(meta["swtool.options"])
    recorded = json.loads(meta["swtool.inputs"])
    weights = inputs[0] / "model.safetensors"
    assert recorded["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded["config.json"] == hashlib.sha256((inputs[0] / "config.json").read_bytes()).hexdigest()


def test_quantize_provenance_names_the_super_weights_file(model, super_json, tmp_path):
    assert invoke(*quantize_args(model, super_json, tmp_path / "q")).exit_code == 0
    recorded = json.loads(metadata(tmp_path / "q")["swtool.inputs"])
    assert hashlib.sha256(super_json.read_bytes()).hexdigest() in recorded.values()


def start_slow(args: list[object]) -> subprocess.Popen:
    process = subprocess.Popen([*SLOW_COMMAND, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "writing", process.communicate()
    return process


@pytest.mark.parametrize(
    "command, sig, race", [("quantize", signal.SIGTERM, True), ("dequantize", signal.SIGINT, False), ("edit", signal.SIGTERM, False)]
)
def test_signal_mid_write_leaves_no_output(command, sig, race, model, super_json, quantized, tmp_path):
    """And (once, to keep the suite fast) a second run on the same output meanwhile refuses."""
    out = tmp_path / "OUT"
    argv, inputs = WRITERS[command](model, super_json, quantized, out)
    before = snapshot(*inputs)
    writer = start_slow(argv)
    assert any(".swtool-tmp-" in n for n in os.listdir(tmp_path))  # half written
    if race:
        second = subprocess.run([*SWTOOL, *map(str, argv)], capture_output=True, text=True, timeout=120)
        assert_user_error(second, f"{out}: another swtool process is writing it")
    writer.send_signal(sig)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 128 + sig
    assert stderr.strip() == f"swtool: error: interrupted by {sig.name}; {out} was not written"
    assert os.listdir(tmp_path) == []
    assert snapshot(*inputs) == before


@pytest.mark.parametrize("command", WRITERS)
def test_full_disk_mid_write(command, model, super_json, quantized, tmp_path, monkeypatch):
    """A write that fails with ENOSPC after the first tensor: one line, exit 2, nothing left."""
    from swtool.formats.hf.writer import ShardedWriter

    original = ShardedWriter.write

    def failing(self, name, tensor):
        if self._position == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    out = tmp_path / "OUT"
    argv, _ = WRITERS[command](model, super_json, quantized, out)
    assert_user_error(invoke(*argv), f"{out}: no space left on device while writing; {out} was not written")
    assert os.listdir(tmp_path) == []


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_a_real_process_running_out_of_file_space(model, super_json, tmp_path):
    out = tmp_path / "OUT"
    done = subprocess.run(
        [*SWTOOL, *map(str, quantize_args(model, super_json, out))], capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size
    )
    assert_user_error(done, f"{out}: file too large while writing; {out} was not written")
    assert os.listdir(tmp_path) == []


def test_refuses_to_write_into_its_input(model, super_json, quantized):
    before = snapshot(model)
    assert_user_error(invoke(*quantize_args(model, super_json, model / "q")), "refusing to write over or into the input")
    assert_user_error(invoke(*quantize_args(model, super_json, model)), "refusing to write over or into the input")
    assert_user_error(invoke(*dequantize_args(quantized, quantized)), "refusing to write over or into the input")
    assert snapshot(model) == before


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight"])
def test_nonfinite_weights_refused_by_quantize_unless_allowed(tmp_path, super_json, tensor):
    tensors = llama_tensors(CONFIG)
    plant(tensors, *SUPER)
    tensors[tensor].reshape(-1)[7] = float("nan")
    llama_dir(tmp_path / "m", tensors=tensors)
    args = quantize_args(tmp_path / "m", super_json, tmp_path / "q")
    assert_user_error(invoke(*args), rf"tensor {tensor} holds 1 NaN/Inf value\(s\) \(first at \[0(, 7)?\]|\[7\]\)")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    if "norm" in tensor:  # copied as it is: --allow-nonfinite lets the NaN through
        assert invoke(*args, "--allow-nonfinite").exit_code == 0
        assert open_checkpoint(tmp_path / "q", allow_nonfinite=True).load(tensor).isnan().sum() == 1
    else:  # round-to-nearest cannot represent it: a clear refusal, even when allowed
        assert_user_error(invoke(*args, "--allow-nonfinite"), rf"tensor {tensor} holds NaN or Inf, which round-to-nearest cannot quantize")
        assert sorted(os.listdir(tmp_path)) == ["m"]


def test_scan_piped_into_quantize_through_a_shell(model, tmp_path):
    """README: swtool scan M --json | swtool quantize M -o Q --super -"""
    done = shell(f"swtool scan {model} --json {' '.join(EFFECT)} | swtool quantize {model} -o Q --super - -q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    assert json.loads(metadata(tmp_path / "Q")["swtool.super"])[0] | {"value": None} == {"tensor": DOWN, "row": SUPER[1], "col": SUPER[2], "value": None}


def test_find_xargs_quantize_pipeline(model, tmp_path):
    """README: find models -name config.json -printf '%h\\n' | xargs -P 2 -I{} swtool quantize {} -o out/{} --block 512 --keep-super"""
    for name in ("alpha", "beta"):
        llama_dir(tmp_path / "models" / name, seed=len(name))
    done = shell("find models -name config.json -printf '%h\\n' | xargs -P 2 -I{} swtool quantize {} -o out/{} --block 512 --keep-super -q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert sorted(os.listdir(tmp_path / "out" / "models")) == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        assert json.loads(metadata(tmp_path / "out" / "models" / name)["swtool.quant"])["block"] == 512
