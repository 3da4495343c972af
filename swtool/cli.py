"""The `swtool` command line: parse options, call the library, render. No logic beyond that.

Exit status: 0 when the command ran, 2 for a user error (one line on stderr,
no traceback), 1 for an internal error. Machine output goes to stdout only.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from swtool.errors import SwtoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, protect and study the super weights of LLM checkpoints, streamed layer by layer.",
)



def _print_version(value: bool) -> None:
    if value:
        from swtool import __version__

        print(__version__)
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Find, protect and study the super weights of LLM checkpoints, streamed layer by layer."""


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def fail(message: str, status: int = 2) -> None:
    print(f"swtool: error: {message}", file=sys.stderr)
    raise typer.Exit(status)


def guarded(run: Callable[[], int]) -> None:
    """Run a command body, mapping our errors to status 2 and anything else to status 1."""
    try:
        status = run()
    except SwtoolError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except typer.Exit:
        raise
    except Exception as exc:  # an internal error: say so, keep the traceback for those who ask
        if os.environ.get("SWTOOL_DEBUG"):
            traceback.print_exc()
        fail(f"internal error: {exc.__class__.__name__}: {exc} (set SWTOOL_DEBUG=1 for the traceback)", 1)
    else:
        raise typer.Exit(status)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SwtoolError(f"--dtype must be one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


@app.command()
def scan(
    models: Annotated[list[Path], typer.Argument(help="HF model directories or GGUF files; several give JSON Lines with --json.")],
    prompt: Annotated[str, typer.Option(help="The one prompt the detection runs.")] = "Apple Inc. is a worldwide tech company.",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document per model on stdout, nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")] = False,
    device: Annotated[str, typer.Option(help="torch device for the forward, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32, bf16 or fp16.")] = "fp32",
    min_ratio: Annotated[float, typer.Option(help="A down_proj output spike counts when |max| >= this times the layer's median |output|.")] = 100.0,
    min_effect: Annotated[float, typer.Option(help="Absolute floor on a super weight's effect (mean KL, nats, when zeroed).")] = 0.5,
    relative_effect: Annotated[float, typer.Option(help="A super weight's effect must also reach this fraction of the strongest candidate's.")] = 0.5,
    expect: Annotated[Optional[str], typer.Option(help="Compare with this model's entries in the super weight directory (default: the model the checkpoint names, if listed).")] = None,
    directory_files: Annotated[Optional[list[Path]], typer.Option("--directory-file", help="Local directory file whose entries --expect also considers (see `swtool directory --file`); repeatable.")] = None,
) -> None:
    """Stream a checkpoint layer by layer and report its super activations and super weights."""

    def run() -> int:
        from swtool import directory as sw_directory
        from swtool.checkpoint import open_checkpoint
        from swtool.detect import scan as run_scan
        from swtool.report import progress_bar, render_expected, render_scan

        compute = torch_dtype(dtype)
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SwtoolError("--device cuda: no CUDA device is available (the CPU is the default)")
        known = sw_directory.load(directory_files or [])
        if expect is not None:
            known.require(expect)  # fail before a long scan, not after
        failures = 0
        for model in models:
            try:
                checkpoint = open_checkpoint(model)
                with progress_bar(f"scan {model.name}", enabled=not (quiet or as_json)) as progress:
                    result = run_scan(
                        checkpoint,
                        prompt=prompt,
                        min_ratio=min_ratio,
                        min_effect=min_effect,
                        relative_effect=relative_effect,
                        dtype=compute,
                        device=device,
                        progress=progress,
                    )
            except SwtoolError as exc:
                if len(models) == 1:
                    raise
                failures += 1
                print(f"swtool: error: {exc}", file=sys.stderr)
                continue
            doc = result.to_json()
            comparison = sw_directory.expected(known, doc["super_weights"], [checkpoint.config.name, model.name, model.stem], expect)
            if comparison is not None:
                doc["expected"] = comparison
            if as_json:
                print(json.dumps(doc), flush=True)
            elif not quiet:
                render_scan(result)
                if comparison is not None:
                    render_expected(comparison)
        return 2 if failures else 0

    guarded(run)


@app.command()
def directory(
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as one JSON document on stdout.")] = False,
    files: Annotated[Optional[list[Path]], typer.Option("--file", help="Also read this local directory file (JSON Lines of entries or `swtool scan --json` documents); repeatable.")] = None,
) -> None:
    """List published super weight coordinates (and your own, with --file)."""

    def run() -> int:
        from swtool import directory as sw_directory
        from swtool.report import render_directory

        known = sw_directory.load(files or [])
        if as_json:
            print(json.dumps({"sources": known.sources, "entries": [e.to_json() for e in known.entries]}))
        else:
            render_directory(known)
        return 0

    guarded(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
