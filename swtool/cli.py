"""The `swtool` command line: parse options, call the library, render. No logic beyond that.

Exit status: 0 when the command ran, 2 for a user error (one line on stderr,
no traceback), 1 for an internal error. Machine output goes to stdout only.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from typer.core import TyperCommand

from swtool.errors import SwtoolError

if TYPE_CHECKING:
    from swtool.readahead import ReadAhead

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, protect and study the super weights of LLM checkpoints, streamed layer by layer.",
)



FILE_OPTIONS = ("text", "plot", "directory_files", "files", "super_file", "verify_text", "imatrix")
"""Options whose value is a file (the rest that take a path take a file or a directory: PATH)."""


class Command(TyperCommand):
    """Help that shows what a user types: `MODEL...`, `PATH`, `FILE`, `N`, `X`, `TEXT`, nothing after a flag.

    Typer labels values with Python type names (`<bool>` on flags, `<list[Path]>`); the metavars
    are set here, once, for every command, when the parameters are handed to click.
    """

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is None:
                param.metavar = metavar(param)
            if param.param_type_name == "argument":  # the name says it all: no type column, no {braces} in the usage
                usage = param.metavar + ("..." if param.nargs != 1 else "")
                param.display_type = lambda ctx: ""
                param._usage_display_name = lambda usage=usage: usage
        return params


def metavar(param) -> str:
    kind = param.bare_type()
    if kind == "bool":
        return ""
    if param.param_type_name == "argument":
        return param.name.upper().removesuffix("S") if param.nargs != 1 else param.name.upper()
    if param.name in FILE_OPTIONS:
        return "FILE" + ("..." if param.nargs != 1 else "")
    return {"Path": "PATH", "int": "N", "float": "X"}.get(kind, "TEXT")


class OptionalValueCommand(Command):
    """A command whose options in `optional_values` may be given without their value.

    Typer (unlike click) has no options with an optional value, so before parsing a bare
    `--smoothquant` (followed by nothing, another option or a non-number such as MODEL) gets its
    default written after it: `--smoothquant` means `--smoothquant 0.85`, `--smoothquant 0.5`
    stays as it is. Arguments after `--` are left alone.
    """

    optional_values: dict[str, str] = {}

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_optional_values(args, self.optional_values))


def with_optional_values(args: list[str], defaults: dict[str, str]) -> list[str]:
    """`args` with `defaults[option]` inserted after each bare option of `defaults` (see OptionalValueCommand)."""
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        out.append(arg)
        if arg in defaults and not _is_number(args[index + 1] if index + 1 < len(args) else None):
            out.append(defaults[arg])
    return out


def _is_number(arg: str | None) -> bool:
    try:
        float(arg)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


class EvalCommand(OptionalValueCommand):
    optional_values = {"--smoothquant": "0.85"}
    """The paper's (and SmoothQuant's Llama recipe's) migration strength."""


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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGINT/SIGTERM turned into atomic.Interrupted while writing
        fail(str(exc) or "interrupted", getattr(exc, "status", 130))
    except typer.Exit:
        raise
    except BrokenPipeError:  # whoever read stdout went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:  # an internal error: say so, keep the traceback for those who ask
        if os.environ.get("SWTOOL_DEBUG"):
            traceback.print_exc()
        fail(f"internal error: {exc.__class__.__name__}: {exc} (set SWTOOL_DEBUG=1 for the traceback)", 1)
    else:
        raise typer.Exit(status)


def show(document: dict, render: Callable[[], None], as_json: bool, quiet: bool) -> None:
    """A command's result on stdout: one JSON document (flushed, for pipelines) or the human rendering."""
    if as_json:
        print(json.dumps(document), flush=True)
    elif not quiet:
        render()


def start(model: Path, output: Path | None = None) -> ReadAhead:
    """Begin a command that computes: the model's bytes read ahead while torch imports (see
    swtool.readahead), the garbage collector paused meanwhile. The import makes some 300,000
    objects, none of them garbage, and the collector's passes over them took a fifth of it
    (1.19 s against 0.93 s); frozen afterwards, they are never traversed again.

    `output`: what the command writes. An output where no file can be created is refused first,
    before the second it takes to import torch. The command records its inputs' sha256
    (swtool.provenance), so the weight files are hashed from now on, on the other core while this
    one imports (swtool.digests)."""
    from swtool.formats.open import prefetch

    if output is not None:
        from swtool.formats.atomic import check_writable

        check_writable(output)
    ahead = prefetch(model)
    if output is not None:
        from swtool.digests import sha256_later

        sha256_later(ahead.files)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS: swtool's products run in torch; its idle pool spun 2-3% of a quantize's CPU
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.enable()
        gc.freeze()
    return ahead


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SwtoolError(f"--dtype must be one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


@app.command(cls=Command)
def scan(
    models: Annotated[list[Path], typer.Argument(help="HF model directories or GGUF files; several give JSON Lines with --json.")],
    prompt: Annotated[str, typer.Option(help="The one prompt the detection runs.")] = "Apple Inc. is a worldwide tech company.",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document per model on stdout, nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")] = False,
    device: Annotated[str, typer.Option(help="torch device for the forward, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32, bf16 or fp16.")] = "fp32",
    min_ratio: Annotated[float, typer.Option(help="A down_proj output spike counts when |max| >= this times the layer's median |output|.")] = 100.0,
    min_effect: Annotated[float, typer.Option(help="The screen: candidates whose effect (mean KL on the prompt, nats, when zeroed) reaches this are verified by perplexity.")] = 0.5,
    min_ppl_ratio: Annotated[float, typer.Option(help="The verdict: a candidate is a super weight when zeroing it alone multiplies the verification text's perplexity by at least this.")] = 2.0,
    max_verify: Annotated[int, typer.Option(help="Verify by perplexity at most this many candidates, strongest effect first (those with effect >= --min-effect).")] = 3,
    verify_text: Annotated[Optional[Path], typer.Option(help="UTF-8 text to verify candidates on (default: the built-in English text); its first --verify-tokens tokens are used.")] = None,
    verify_tokens: Annotated[Optional[int], typer.Option(help="Tokens of text the verification runs (default: 64 of the built-in text, 128 of --verify-text); its cost is proportional to them.")] = None,
    expect: Annotated[Optional[str], typer.Option(help="Compare with this model's entries in the super weight directory (default: the model the checkpoint names, if listed).")] = None,
    directory_files: Annotated[Optional[list[Path]], typer.Option("--directory-file", help="Local directory file whose entries --expect also considers (see `swtool directory --file`); repeatable.")] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Go on when weights hold NaN or Inf (refused by default).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw per-layer down_proj maxima, super weight layers marked, into this PNG (needs matplotlib).")] = None,
) -> None:
    """Stream a checkpoint layer by layer and report its super activations and super weights."""

    def run() -> int:
        ahead = start(models[0])  # the disk works while torch imports; stopped once the checkpoint is open
        from swtool import directory as sw_directory
        from swtool.report import progress_bar, render_scan
        from swtool.scan import check_device, scan_model

        compute = torch_dtype(dtype)
        if plot is not None:
            if len(models) > 1:
                raise SwtoolError("--plot draws one model; give a single MODEL")
            from swtool.plot import check_plot_target

            check_plot_target(plot)  # fail before the scan, not after it, when matplotlib is missing or PNG cannot be written
        check_device(device)
        known = sw_directory.load(directory_files or [])
        if expect is not None:
            known.require(expect)  # fail before a long scan, not after
        bars = partial(progress_bar, enabled=not (quiet or as_json))
        failures = 0
        for model in models:
            try:
                options = dict(
                    prompt=prompt,
                    min_ratio=min_ratio,
                    min_effect=min_effect,
                    min_ppl_ratio=min_ppl_ratio,
                    max_verify=max_verify,
                    verify_text=verify_text,
                    verify_tokens=verify_tokens,
                    dtype=compute,
                    device=device,
                )
                result, doc = scan_model(model, known, expect, bars, allow_nonfinite=allow_nonfinite, ahead=ahead, **options)
            except SwtoolError as exc:
                if len(models) == 1:
                    raise
                failures += 1
                print(f"swtool: error: {exc}", file=sys.stderr)
                continue
            if plot is not None:
                from swtool.plot import plot_scan

                plot_scan(result, plot)
            show(doc, partial(render_scan, result, doc.get("expected")), as_json, quiet)
        return 2 if failures else 0

    guarded(run)


@app.command(cls=Command)
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


@app.command(cls=Command, rich_help_panel="Quantize")
def quantize(
    model: Annotated[Path, typer.Argument(help="HF model directory or GGUF file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (or file, for --format gguf).")],
    bits: Annotated[str, typer.Option(metavar="N|fp8", help="Bits per weight: 8, 4, 3 or 2; fp8 (E4M3, one scale per output channel) with --format compressed-tensors.", rich_help_panel="Quantization")] = "4",
    block: Annotated[str, typer.Option(help="Block: N consecutive elements of the row-major (out, in) weight, 'channel' (one row) or 'tensor'.", rich_help_panel="Quantization")] = "512",
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric absmax scales, or asymmetric min-max with a zero point. Default: asymmetric for safetensors (swtool-rtn); symmetric for compressed-tensors, the scheme transformers loads as it is and vLLM serves at every width.", rich_help_panel="Quantization")] = None,
    clip: Annotated[str, typer.Option(help="Outlier clipping: none, z:K (per block, mean|w| + K std|w|), pct:P (per block, the 1-P quantile of |w|) or auto (per tensor, least error weighted by each input column's mean square on the scan prompt).", rich_help_panel="Quantization")] = "none",
    include_embeddings: Annotated[bool, typer.Option("--include-embeddings", help="Quantize the token embeddings too.", rich_help_panel="Quantization")] = False,
    include_head: Annotated[bool, typer.Option("--include-head", help="Quantize the LM head too.", rich_help_panel="Quantization")] = False,
    keep_super: Annotated[bool, typer.Option("--keep-super/--no-keep-super", help="Hold super weights out of quantization and keep them exactly (fp16); with --format gguf they stay in their tensors, written at --super-type.", rich_help_panel="Super weights")] = True,
    super_file: Annotated[Optional[str], typer.Option("--super", help="`swtool scan --json` output naming the super weights (FILE, or - for stdin); without it quantize runs the scan.", rich_help_panel="Super weights")] = None,
    out_format: Annotated[Optional[str], typer.Option("--format", help="Output format: safetensors (swtool-rtn), gguf, or compressed-tensors (transformers and vLLM load it; super weights' modules stay unquantized). Default: gguf when OUT ends in .gguf, else safetensors.", rich_help_panel="Output")] = None,
    gguf_type: Annotated[Optional[str], typer.Option("--type", help="--format gguf: llama-quantize's mix or type, with its per-tensor rules: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16 or F32 (default: Q8_0 for --bits 8, Q4_0 for --bits 4). --block/--sym/--clip apply to safetensors only.", rich_help_panel="GGUF")] = None,
    super_type: Annotated[str, typer.Option("--super-type", help="--format gguf: type of the tensors holding super weights (they stay in the tensor), when more precise than its planned type: Q8_0, Q6_K or F16.", rich_help_panel="GGUF")] = "Q8_0",
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="--format gguf: an importance matrix (swtool imatrix's or llama-imatrix's file) the quantizers weight their rounding by, as llama-quantize --imatrix.", rich_help_panel="GGUF")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB, 500MB.", rich_help_panel="Output")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.", rich_help_panel="Output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Go on when weights hold NaN or Inf (refused by default).")] = False,
) -> None:
    """Round-to-nearest block quantization, streamed tensor by tensor, with super weights held out."""

    def run() -> int:
        ahead = start(model, output)
        from swtool.quantize import QuantizeRequest, quantize_model
        from swtool.report import progress_bar, render_quantize

        request = QuantizeRequest(
            model, output, bits, block, sym, clip, include_embeddings, include_head, keep_super, super_file,
            out_format, gguf_type, super_type, max_shard_size, force, allow_nonfinite, imatrix,
        )  # fmt: skip
        report = quantize_model(request, partial(progress_bar, enabled=not quiet), ahead)
        if not quiet:
            render_quantize(report, output)
        return 0

    guarded(run)


@app.command("eval", cls=EvalCommand)
def eval_(
    model: Annotated[Path, typer.Argument(help="HF model directory or GGUF file.")],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to measure perplexity on.")],
    ctx: Annotated[int, typer.Option(help="Window length in tokens (capped at the model's context).")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate only the first N windows (quick runs).")] = None,
    batch: Annotated[int, typer.Option(help="Windows pushed through a layer at once.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")] = False,
    device: Annotated[str, typer.Option(help="torch device for the forward, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32, bf16 or fp16.")] = "fp32",
    zero_super: Annotated[bool, typer.Option("--zero-super", help="Evaluate with the super weights zeroed (in memory).", rich_help_panel="Ablations")] = False,
    scale_super: Annotated[Optional[float], typer.Option(help="Evaluate with the super weights multiplied by F.", rich_help_panel="Ablations")] = None,
    zero_outliers: Annotated[int, typer.Option(help="Evaluate with the N largest weights of each linear tensor zeroed, super weights excepted.", rich_help_panel="Ablations")] = 0,
    restore_super_act: Annotated[bool, typer.Option("--restore-super-act", help="With --zero-super: write the original super activation back (Prune SW, +SA).", rich_help_panel="Ablations")] = False,
    super_file: Annotated[Optional[str], typer.Option("--super", help="swtool scan --json output naming the super weights (- for stdin); default: scan.", rich_help_panel="Ablations")] = None,
    w_bits: Annotated[Optional[int], typer.Option(help="Fake-quantize the linear weights per tensor (RTN, symmetric).", rich_help_panel="Simulated quantization")] = None,
    a_bits: Annotated[Optional[int], typer.Option(help="Fake-quantize every linear input per token (RTN, symmetric).", rich_help_panel="Simulated quantization")] = None,
    a_granularity: Annotated[str, typer.Option(help="Activation scales: token (one per token) or tensor (one per window).", rich_help_panel="Simulated quantization")] = "token",
    keep_super_act: Annotated[bool, typer.Option("--keep-super-act", help="Hold each window's largest activation out of its group's quantization (data-free).", rich_help_panel="Simulated quantization")] = False,
    smoothquant: Annotated[Optional[float], typer.Option(metavar="[ALPHA]", help="SmoothQuant baseline with this migration strength (bare --smoothquant: 0.85, the paper's); calibrates on the text.", rich_help_panel="Simulated quantization")] = None,
    calibration_windows: Annotated[int, typer.Option(help="Windows after the evaluated ones used to calibrate SmoothQuant.", rich_help_panel="Simulated quantization")] = 8,
) -> None:
    """Perplexity of MODEL on a text, streamed layer by layer (GPTQ-style non-overlapping windows)."""

    def run() -> int:
        ahead = start(model)
        from swtool.ablation import EditPlan
        from swtool.evaluate import Options, evaluate_model
        from swtool.report import progress_bar, render_eval
        from swtool.scan import check_device

        compute = torch_dtype(dtype)
        check_device(device)
        options = Options(
            edit=EditPlan(zero_super=zero_super, scale_super=scale_super, zero_outliers=zero_outliers),
            restore_super_act=restore_super_act,
            w_bits=w_bits,
            a_bits=a_bits,
            a_granularity=a_granularity,
            keep_super_act=keep_super_act,
            smoothquant=smoothquant,
            calibration_windows=calibration_windows,
        )
        with progress_bar(f"eval {model.name}", enabled=not (quiet or as_json)) as progress:
            result = evaluate_model(
                model, text, options, super_file, ahead=ahead, ctx=ctx, max_windows=max_windows, batch=batch, dtype=compute, device=device, progress=progress
            )
        show(result.to_json(), lambda: render_eval(result), as_json, quiet)
        return 0

    guarded(run)


@app.command(cls=Command, rich_help_panel="Quantize")
def imatrix(
    model: Annotated[Path, typer.Argument(help="HF model directory or GGUF file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output imatrix file (GGUF, as llama-imatrix writes it).")],
    text: Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file to collect activations on (llama-imatrix's -f).")] = None,
    builtin: Annotated[bool, typer.Option("--builtin", help="Use swtool's built-in English text (the one scan verifies with) instead of --text: a data-free imatrix.")] = False,
    ctx: Annotated[int, typer.Option(help="Tokens per chunk (llama-imatrix's -c); the text needs at least twice as many.")] = 512,
    chunks: Annotated[Optional[int], typer.Option(help="Use only the first N chunks (default: all).")] = None,
    batch: Annotated[int, typer.Option(help="Tokens per forward batch (llama-imatrix's -b): batch // ctx chunks go through a layer at once.")] = 2048,
    ubatch: Annotated[int, typer.Option(help="llama.cpp's micro-batch (-ub): products on fewer than 16 tokens of one are not collected, as llama-imatrix does.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout, nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")] = False,
    device: Annotated[str, typer.Option(help="torch device for the forward, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32, bf16 or fp16.")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Importance matrix of MODEL on a text (llama-imatrix's GGUF file, for llama-quantize --imatrix), streamed layer by layer."""

    def run() -> int:
        ahead = start(model, output)
        from swtool.imatrix import imatrix_model
        from swtool.report import progress_bar, render_imatrix
        from swtool.scan import check_device

        compute = torch_dtype(dtype)
        check_device(device)
        with progress_bar(f"imatrix {model.name}", enabled=not (quiet or as_json)) as progress:
            result = imatrix_model(
                model, output, text, builtin, ahead=ahead, ctx=ctx, chunks=chunks, batch=batch, ubatch=ubatch,
                force=force, dtype=compute, dtype_option=dtype, device=device, progress=progress,
            )  # fmt: skip
        show(result.to_json(), lambda: render_imatrix(result), as_json, quiet)
        return 0

    guarded(run)


@app.command(cls=Command, rich_help_panel="Quantize")
def dequantize(
    quantized: Annotated[Path, typer.Argument(help="A directory written by swtool quantize, or a GGUF file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output HF model directory.")],
    dtype: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: the source's dtype, recorded at quantization; fp16 for GGUF).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB, 500MB.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Write a quantized checkpoint (swtool's, or a GGUF) back as a standard Hugging Face checkpoint."""

    def run() -> int:
        ahead = start(quantized, output)
        from swtool.dequantize import dequantize_model

        dequantize_model(quantized, output, torch_dtype(dtype) if dtype is not None else None, dtype, max_shard_size, force, ahead)
        return 0

    guarded(run)


@app.command(cls=Command)
def edit(
    model: Annotated[Path, typer.Argument(help="HF model directory or GGUF file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the edited checkpoint, in MODEL's format: a directory, or OUT.gguf.")],
    zero_super: Annotated[bool, typer.Option("--zero-super", help="Set the super weights to zero.")] = False,
    scale_super: Annotated[Optional[float], typer.Option(help="Multiply the super weights by F.")] = None,
    zero_outliers: Annotated[int, typer.Option(help="Zero the N largest-magnitude weights of each linear tensor, super weights excepted.")] = 0,
    super_file: Annotated[Optional[str], typer.Option("--super", help="swtool scan --json output naming the super weights (- for stdin); default: scan.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB or 500MB.")] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Write a copy of MODEL with its super weights zeroed or scaled, or its other outliers pruned, streamed."""

    def run() -> int:
        ahead = start(model, output)
        from swtool.ablation import EditPlan
        from swtool.edit import edit_model
        from swtool.report import render_edit

        plan = EditPlan(zero_super=zero_super, scale_super=scale_super, zero_outliers=zero_outliers)
        checkpoint, plan, notes = edit_model(model, output, plan, super_file, force=force, max_shard_size=max_shard_size, ahead=ahead)
        if not quiet:
            render_edit(checkpoint, output, plan, notes)
        return 0

    guarded(run)


def main() -> None:
    """The console script: the typer app, with option-parsing errors as one line like every other user error.

    It leaves through `leave` (os._exit once stdout and stderr are flushed): by then every
    command has closed, and atomically renamed, what it wrote, and the interpreter's
    teardown of torch alone takes 0.3-0.6 s, a tenth of a one-prompt scan.
    """
    exceptions = sys.modules[typer.BadParameter.__module__]  # click's, or the copy of click newer typer vendors
    try:
        status = app(standalone_mode=False) or 0
    except getattr(exceptions, "NoArgsIsHelpError", ()) as exc:  # bare `swtool`: typer has printed the help
        status = exc.exit_code
    except exceptions.UsageError as exc:  # unknown option, `--bits abc`, missing argument...
        command = exc.ctx.command_path if exc.ctx else "swtool"
        print(f"swtool: error: {exc.format_message()} (see {command} --help)", file=sys.stderr)
        status = exc.exit_code
    except typer.Abort:  # Ctrl-C outside a command body
        print("swtool: error: interrupted", file=sys.stderr)
        status = 130
    except typer.Exit as exc:
        status = exc.exit_code
    except BrokenPipeError:  # outside a command body (--version, --help): as `guarded` does
        status = 141
    except OSError as exc:  # stdout on a full disk, say, outside a command body
        status = write_failed(exc)
    leave(status)


def write_failed(exc: OSError) -> int:
    try:
        print(f"swtool: error: cannot write the output: {exc}", file=sys.stderr)
    except OSError:
        pass
    return 1


def leave(status: int) -> NoReturn:
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # whoever read stdout went away before the last bytes: as `guarded` says it
        status = status or 141
    except OSError as exc:  # the last buffered bytes did not fit (a full disk)
        status = status or write_failed(exc)
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(status)


if __name__ == "__main__":
    main()
