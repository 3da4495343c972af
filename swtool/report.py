"""Human-facing output: results (scan tables, the directory, perplexity) on stdout, progress and notes on stderr.

A result is what the user asked for, so `swtool scan M > out.txt` and `swtool directory | grep`
work: on a terminal it is a rich table in colour; piped, plain text with no colour and lines as
long as they need (never wrapped to a fake terminal width). `--json` replaces it with one JSON
document. Progress bars, notes and write summaries go to stderr, so they never reach a pipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from swtool.directory import FOUND, NOT_FOUND, Directory

if TYPE_CHECKING:  # the directory listing needs no torch
    from swtool.detect import ScanResult

stderr = Console(stderr=True)

PIPED_WIDTH = 10_000
"""Console width when stdout is not a terminal: tables take the width their content needs."""


def results() -> Console:
    """The console for results: stdout as it is now (tests swap it), plain when it is not a terminal."""
    terminal = sys.stdout.isatty()
    return Console(file=sys.stdout, no_color=not terminal, highlight=False, width=None if terminal else PIPED_WIDTH, soft_wrap=not terminal)


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


def render_scan(result: ScanResult, expected: list[dict] | None = None) -> None:
    """The scan's tables, then the comparison with the super weight directory where there is one."""
    out = results()
    out.print(f"[bold]{result.model}[/] ({result.architecture}), prompt of {result.tokens} tokens, one streamed pass with {result.variants} variants")
    check = result.verification
    if check.get("rows"):
        out.print(
            f"verified by perplexity on the {escape(str(check['text']))} text ({check['tokens']} tokens, {check['dtype']}, original perplexity {_fmt(check['ppl'])}): "
            f"a super weight multiplies it by at least {_fmt(result.settings['min_ppl_ratio'])} when zeroed"
        )
    verified = [c for c in result.candidates if c.ppl_ratio == c.ppl_ratio]
    for title, rows in (("Super weights", result.super_weights), ("Candidates verified and rejected", [c for c in verified if not c.is_super])):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for column in ("layer", "tensor", "row", "col", "value", "activation", "effect (KL, nats)", "ppl ratio"):
            table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold" if column == "tensor" else "ellipsis")
        for c in rows:
            tensor = c.tensor if c.expert is None else f"{c.tensor} (expert {c.expert})"
            table.add_row(str(c.layer), tensor, str(c.row), str(c.col), _fmt(c.value), _fmt(c.activation), _fmt(c.effect), _fmt(c.ppl_ratio))
        out.print(table)
    if not result.super_weights:
        out.print("No super weight found: no massive down_proj spike whose removal breaks the model (perplexity).")
    unverified = len(result.candidates) - len(verified)
    if unverified:
        out.print(f"{unverified} other candidate(s) examined and not verified (effect below {_fmt(result.settings['min_effect'])} nats or beyond --max-verify); see --json.")
    layers = Table(title="down_proj maxima per layer", title_justify="left")
    for column in ("layer", "in max", "in ch", "out max", "out ch", "tok", "out/median"):
        layers.add_column(column, justify="right")
    marked = {(c.layer, c.expert) for c in result.super_weights}
    for s in result.layers:
        style = "bold red" if (s.layer, s.expert) in marked else None
        layer = str(s.layer) if s.expert is None else f"{s.layer} e{s.expert}"
        layers.add_row(layer, _fmt(s.in_max), str(s.in_channel), _fmt(s.out_max), str(s.out_channel), str(s.out_token), _fmt(s.ratio), style=style)
    out.print(layers)
    if expected is not None:
        render_expected(expected)


def render_directory(directory: Directory) -> None:
    out = results()
    table = Table(title="Super weight directory (layer 0-based; row, col in HF nn.Linear order)", title_justify="left")
    for column in ("model", "layer", "tensor in layer", "row", "col", "source"):
        table.add_column(column, justify="right" if column in ("layer", "row", "col") else "left", overflow="fold")
    notes: list[str] = []
    for e in directory.entries:
        tensor = e.tensor.removeprefix(f"model.layers.{e.layer}.").removeprefix(f"blk.{e.layer}.").removesuffix(".weight")
        tensor += "" if e.expert is None else f" (expert {e.expert})"
        source = e.source
        if e.note:
            notes.append(e.note)
            source += f" (note {len(notes)})"
        table.add_row(e.model, str(e.layer), tensor, str(e.row), str(e.col), source)
    out.print(table)
    for number, note in enumerate(notes, 1):
        out.print(f"note {number}: {note}", markup=False)
    for label, meaning in directory.sources.items():
        out.print(f"{label}: {meaning}", markup=False)


def render_expected(comparison: list[dict]) -> None:
    out = results()
    model = comparison[0]["model"] if comparison else "?"
    table = Table(title=f"Directory entries for {model}", title_justify="left")
    for column in ("layer", "row", "col", "source", "status", "found at"):
        table.add_column(column, justify="right" if column in ("layer", "row", "col") else "left")
    styles = {FOUND: "green", NOT_FOUND: "red"}
    for item in comparison:
        where = escape(", ".join(f"{w['layer']} [{w['row']}, {w['col']}]" for w in item["found_at"] if item["status"] != FOUND))
        table.add_row(str(item["layer"]), str(item["row"]), str(item["col"]), item["source"], item["status"], where, style=styles.get(item["status"], "yellow"))
    out.print(table)


def render_quantize(report, output) -> None:
    """One summary of `swtool quantize` (a swtool.quantize.QuantizeReport) on stderr."""
    stderr.print(f"[bold]{output}[/]: {report.quantized} tensors quantized, {report.kept} kept as stored")
    for tensor, row, col, value in report.held:
        stderr.print(f"  held out {tensor}[{row}, {col}] = {_fmt(value)} ({report.held_how})")
    if not report.held:
        stderr.print("  no super weight held out")
    if report.thresholds:
        stderr.print(f"  --clip auto clipped {len(report.thresholds)} tensors")
    for note in report.notes:
        stderr.print(f"  note: {note}")


def render_eval(result) -> None:
    """One line for `swtool eval`: what was measured, on how much text, and the perplexity."""
    out = results()
    changed = {k: v for k, v in result.settings.items() if v not in (False, None, 0, []) and k not in ("super_weights", "calibration_windows")}
    label = ", ".join(f"{k}={v}" for k, v in changed.items()) or "as stored"
    out.print(
        f"[bold]{result.model}[/] ({label}) on {result.text}: {result.windows} windows of {result.ctx} tokens "
        f"(of {result.tokens} tokens): nll {result.nll:.4f}, perplexity [bold]{result.ppl:.3f}[/]"
    )


def render_edit(checkpoint, output, plan, notes=()) -> None:
    """What `swtool edit` changed and where it wrote it, and anything the user should know (type changes)."""
    for note in notes:
        stderr.print(f"note: {note}")
    supers = ", ".join(f"{checkpoint.stored_name(s.tensor)}[{s.row}, {s.col}]" for s in plan.supers)
    actions = []
    if plan.factor is not None:
        actions.append(f"super weights {'zeroed' if plan.zero_super else f'scaled by {plan.factor:g}'} ({supers})")
    if plan.zero_outliers:
        actions.append(f"{plan.zero_outliers} largest weights of each linear tensor zeroed (super weights kept)")
    stderr.print(f"wrote {output}: {'; '.join(actions)}")


def render_imatrix(result) -> None:
    """One line for `swtool imatrix`: what was collected on how much text, and where it went."""
    stderr.print(
        f"[bold]{result.model}[/] on {result.text}: {result.chunks} chunks of {result.ctx} tokens (of {result.text_tokens} tokens), "
        f"{result.tensors} weights -> [bold]{result.output}[/]"
    )
