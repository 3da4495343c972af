"""The C kernels (swtool/kernels/core.c) write the same bytes as the torch paths they replace.

Every comparison runs both engines in this process: the kernels as loaded, and
the torch fallback (native.kernels() patched to None, what a machine without a
C compiler runs). The GGML codecs are also held against gguf-py directly in
test_ggml_codecs.py, with whichever engine is active.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from swtool import native
from swtool.codecs import ggml, rtn
from swtool.codecs.ggml import TYPES, NonFiniteError, encode
from swtool.codecs.rtn import QuantSpec, quantize
from swtool.errors import SwtoolError
from tests.helpers.ggml_reference import edge_cases, reference

pytestmark = pytest.mark.skipif(native.kernels() is None, reason=f"native kernels unavailable: {native.status}")


@pytest.fixture
def torch_only(monkeypatch):
    """Within the test, every caller takes the torch path."""

    def use_torch():
        monkeypatch.setattr(native, "kernels", lambda: None)

    return use_torch


def test_kernels_load_where_a_compiler_exists():
    assert shutil.which("cc") or shutil.which("gcc")
    assert native.kernels() is not None and native.status.startswith("native kernels")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SWTOOL_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None and "SWTOOL_NATIVE=0" in native.status
    finally:
        monkeypatch.delenv("SWTOOL_NATIVE")
        native.kernels.cache_clear()
    assert native.kernels() is not None


def test_a_failing_compiler_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("SWTOOL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None and native.status.startswith("torch fallback")
        assert encode(np.ones((2, 32), np.float32), TYPES["Q8_0"]).tobytes() == reference(np.ones((2, 32), np.float32), "Q8_0")
    finally:
        monkeypatch.delenv("CC")
        native.kernels.cache_clear()


@pytest.mark.parametrize("name", sorted(set(TYPES) - {"F32"}))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sources_read_directly(name, dtype):
    """fp16/bf16 tensors go to the kernels without an fp32 copy and encode as their fp32 values do."""
    data = torch.from_numpy(np.concatenate([edge_cases(), np.random.default_rng(5).standard_normal((40, 64), np.float32)])).to(dtype)
    data[6] = data[6].clamp(-60000, 60000)  # fp16 cannot hold the overflow row
    data = data[torch.isfinite(data).all(dim=1)]
    assert encode(data, TYPES[name]).tobytes() == reference(data.float().numpy(), name)


def test_low_precision_non_finite_refused():
    data = torch.randn(4, 64, dtype=torch.float16)
    data[1, 3] = float("inf")
    with pytest.raises(NonFiniteError):
        encode(data, TYPES["Q4_0"])


SPECS = [QuantSpec(b, blk, sym) for b in (2, 3, 4, 8) for blk in (32, 100, "channel") for sym in (False, True)] + [QuantSpec(4, "tensor"), QuantSpec(8, 4096, True)]


def rtn_cases() -> list[torch.Tensor]:
    rng = np.random.default_rng(11)
    special = torch.from_numpy(edge_cases()[:15])
    special[6] /= 1e3  # scales must fit fp16 for RTN
    special[7] /= 1e3
    return [
        torch.from_numpy(rng.standard_normal((67, 129), np.float32) * 0.02),  # shorter last blocks everywhere
        special,
        special.to(torch.bfloat16),
        torch.from_numpy(rng.standard_normal((33, 320), np.float32)).to(torch.float16),
        torch.from_numpy(rng.standard_normal((48, 256), np.float32) * 0.02).to(torch.bfloat16),
    ]


def rtn_bytes(weight: torch.Tensor, spec: QuantSpec) -> tuple[bytes, bytes, bytes]:
    q = quantize(weight, spec)
    return q.codes.numpy().tobytes(), q.scale.numpy().tobytes(), q.zero.numpy().tobytes()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_kernel_matches_torch(spec, torch_only, monkeypatch):
    monkeypatch.setattr(rtn, "CHUNK", 3000)  # many chunks, uneven against the blocks
    monkeypatch.setattr(rtn, "NATIVE_CHUNK", 3000)
    fast = [rtn_bytes(w, spec) for w in rtn_cases()]
    torch_only()
    slow = [rtn_bytes(w, spec) for w in rtn_cases()]
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, f"case {i}: native and torch RTN bytes differ"


def test_rtn_kernel_refusals_match_torch():
    bad = torch.randn(4, 64)
    bad[2, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        quantize(bad, QuantSpec(4, 32))
    huge = torch.randn(4, 64) * 1e6
    with pytest.raises(SwtoolError, match="fp16 range"):
        quantize(huge, QuantSpec(4, 32))


@pytest.mark.parametrize("name", sorted(set(TYPES) - {"F32"}))
def test_ggml_kernels_match_torch_codecs(name, torch_only):
    data = np.concatenate([edge_cases(), np.random.default_rng(9).standard_normal((64, 64), np.float32)])
    fast = encode(data, TYPES[name]).tobytes()
    torch_only()
    assert encode(data, TYPES[name]).tobytes() == fast == reference(data, name)
    assert ggml.native.kernels() is None


def test_a_shared_temporary_directory_is_not_trusted(monkeypatch, tmp_path):
    """Without a usable cache home, a temporary directory someone else could write to is refused."""
    import os
    import tempfile

    not_a_directory = tmp_path / "cache-home"
    not_a_directory.write_text("")
    planted = tmp_path / f"swtool-native-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.delenv("SWTOOL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_directory))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None and "not a private directory" in native.status
        planted.chmod(0o700)
        native.kernels.cache_clear()
        assert native.kernels() is not None  # the same directory, private: compiled into it and used
        assert list(planted.glob("kernels-*.so"))
    finally:
        native.kernels.cache_clear()


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_encode_on_the_command_pool(engine, torch_only, monkeypatch):
    """Inside parallel_chunks() (as `swtool quantize` runs it) encode uses that pool; same bytes, errors still raised."""
    from swtool.workers import parallel_chunks

    if engine == "torch":
        torch_only()
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", 2048)
    monkeypatch.setattr(ggml, "NATIVE_CHUNK_ELEMENTS", 2048)
    data = np.random.default_rng(4).standard_normal((64, 256), np.float32)
    with parallel_chunks(2):
        for name in ("Q8_0", "Q4_1", "Q5_0", "F16"):
            assert encode(data, TYPES[name]).tobytes() == reference(data, name)
        data[50, 7] = np.nan
        with pytest.raises(NonFiniteError):
            encode(data, TYPES["Q4_0"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("src") / "model"
    tiny.plant(tiny.build("llama", directory), directory, [(1, 5, 7)])
    return directory


def quantize_files(source, out, *options: str) -> dict[str, bytes]:
    from typer.testing import CliRunner

    from swtool.cli import app

    result = CliRunner().invoke(app, ["quantize", str(source), "-o", str(out), "--no-keep-super", "-q", *options])
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.is_dir() else {out.name: out.read_bytes()}


@pytest.mark.parametrize("options", [("--bits", "4", "--block", "64"), ("--bits", "3", "--block", "channel", "--sym"), ("--format", "gguf", "--type", "Q4_1")], ids=" ".join)
def test_quantize_writes_the_same_files_with_either_engine(options, tiny_model, tmp_path, torch_only):
    """`swtool quantize` end to end: the C kernels change nothing in what is written."""
    name = "out.gguf" if "gguf" in options else "out"
    fast = quantize_files(tiny_model, tmp_path / "fast" / name, *options)
    torch_only()
    assert quantize_files(tiny_model, tmp_path / "slow" / name, *options) == fast
