"""PNG plots for people who would rather look than read. matplotlib is optional (the `plot` extra), imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swtool.detect import ScanResult
from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output, check_writable


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SwtoolError("plots need matplotlib: pip install 'swtool[plot]' (or pip install matplotlib)") from None
    return plt


def check_plot_target(path: Path) -> None:
    """Before a scan: matplotlib is there and the PNG's directory can take it."""
    pyplot()
    check_writable(Path(path))


def save(figure: Any, path: Path, force: bool = True) -> None:
    """Write the figure as PNG through a temporary sibling, reproducibly (no timestamp metadata)."""
    with atomic_output(Path(path), directory=False, force=force) as temp:
        with temp.open("wb") as fh:
            figure.savefig(fh, format="png", dpi=110, metadata={"Software": None})


def plot_scan(result: ScanResult, path: Path, force: bool = True) -> None:
    """The paper's Figure 3 view: per layer, max |down_proj input| and |output|, super weight layers marked."""
    plt = pyplot()
    layers = [s.layer for s in result.layers]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    axis.plot(layers, [s.in_max for s in result.layers], marker="o", markersize=3, label="max |down_proj input|")
    axis.plot(layers, [s.out_max for s in result.layers], marker="s", markersize=3, label="max |down_proj output|")
    for i, layer in enumerate(sorted({c.layer for c in result.super_weights})):
        axis.axvline(layer, color="red", linestyle="--", linewidth=1, label="super weight layer" if i == 0 else None)
    axis.set_yscale("log")
    axis.set_xlabel("layer")
    axis.set_ylabel("max |activation|")
    axis.set_title(f"{Path(result.model).name}: down_proj maxima per layer", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save(figure, path, force)
    plt.close(figure)
