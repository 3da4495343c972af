"""swtool scan --plot: a PNG of per-layer down_proj maxima; a clear error when matplotlib is missing."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from swtool.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from tests.helpers import tiny

    directory = tmp_path_factory.mktemp("plot")
    model = tiny.build("llama", directory)
    tiny.plant(model, directory, [(1, 5, 7)])
    return directory


def test_scan_plot_writes_a_png(planted, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "maxima.png"
    result = CliRunner().invoke(app, ["scan", str(planted), "--plot", str(target), "--quiet"])
    assert result.exit_code == 0, result.output
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name != "maxima.png"]  # no temporary or lock file left


def test_missing_matplotlib_is_a_user_error(planted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    target = tmp_path / "maxima.png"
    result = CliRunner().invoke(app, ["scan", str(planted), "--plot", str(target)])
    assert result.exit_code == 2 and "matplotlib" in result.output
    assert not target.exists()
