"""Human-facing output: rich tables and progress bars, always on stderr.

stdout is reserved for machine output (`--json`), so pipelines never see a
table or a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from swtool.detect import ScanResult

stderr = Console(stderr=True)


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A callback (done, total) that drives a bar on a terminal, or does nothing."""
    if not (enabled and stderr.is_terminal):
        yield lambda done, total: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fmt(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def render_scan(result: ScanResult) -> None:
    stderr.print(f"[bold]{result.model}[/] ({result.architecture}), prompt of {result.tokens} tokens, {result.passes} streamed passes")
    table = Table(title="Super weights", title_justify="left")
    for column in ("layer", "tensor", "row", "col", "value", "activation", "effect (KL, nats)"):
        table.add_column(column, justify="right" if column not in ("tensor",) else "left")
    for c in result.super_weights:
        table.add_row(str(c.layer), c.tensor, str(c.row), str(c.col), _fmt(c.value), _fmt(c.activation), _fmt(c.effect))
    if result.super_weights:
        stderr.print(table)
    else:
        stderr.print("No super weight found: no massive down_proj spike whose removal matters.")
    rejected = [c for c in result.candidates if not c.is_super]
    if rejected:
        stderr.print(
            f"{len(rejected)} other candidate(s) examined and rejected (effect below {_fmt(result.settings.get('effect_bar', float('nan')))} nats); see --json."
        )
    layers = Table(title="down_proj maxima per layer", title_justify="left")
    for column in ("layer", "in max", "in ch", "out max", "out ch", "tok", "out/median"):
        layers.add_column(column, justify="right")
    marked = {c.layer for c in result.super_weights}
    for s in result.layers:
        style = "bold red" if s.layer in marked else None
        layers.add_row(str(s.layer), _fmt(s.in_max), str(s.in_channel), _fmt(s.out_max), str(s.out_channel), str(s.out_token), _fmt(s.ratio), style=style)
    stderr.print(layers)


def render_quantize(report, output) -> None:
    """One summary of `swtool quantize` (a swtool.quantize.QuantizeReport) on stderr."""
    stderr.print(f"[bold]{output}[/]: {report.quantized} tensors quantized, {report.kept} kept as stored")
    for tensor, row, col, value in report.held:
        stderr.print(f"  held out {tensor}[{row}, {col}] = {_fmt(value)} (fp16, restored on dequantize)")
    if not report.held:
        stderr.print("  no super weight held out")
    if report.thresholds:
        stderr.print(f"  --clip auto clipped {len(report.thresholds)} tensors")
