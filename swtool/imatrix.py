"""`swtool imatrix`: llama.cpp's importance matrix of a model on a text, streamed layer by layer.

The file is what `llama-imatrix -m MODEL -f TEXT -c CTX [--chunks N] [-b B]` writes, so
`llama-quantize --imatrix` takes it unchanged; the values agree with llama-imatrix's up to
the differences in arithmetic (swtool dequantizes to float32, llama.cpp multiplies quantized
weights by quantized activations). llama-imatrix's rules, followed here (tools/imatrix/imatrix.cpp,
`compute_imatrix` and `collect_imatrix`):

- the text is read whole, one trailing newline dropped, and tokenized with the model's special
  tokens added (BOS where the vocabulary asks for one) but special-token text in it kept as text;
- it must hold at least 2 x ctx tokens; chunks are its consecutive ctx-token pieces (the tail is
  dropped), the first `chunks` of them; each chunk starts at position 0 with its first token
  replaced by BOS where the vocabulary adds one;
- every token of a chunk counts (the first half is not skipped as perplexity skips it), except in
  dense products run on a micro-batch of fewer than 16 tokens, which llama.cpp does not collect;
  which micro-batches those are follows from -b and -ub (`collected_tokens`);
- tokens routed to an expert count for that expert (once per token and expert);
- chunk_count is the largest count of any weight in chunks (rounded to nearest), chunk_size ctx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swtool.data.text import builtin_text_path, read_utf8
from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output, check_target
from swtool.formats.open import open_checkpoint
from swtool.model.tokenizer import load_tokenizer, text_ids
from swtool.provenance import Provenance
from swtool.readahead import ReadAhead
from swtool.formats.base import Checkpoint
from swtool.formats.gguf.imatrix import Entry, Imatrix, write_imatrix
from swtool.formats.gguf.imatrix_stats import imatrix_stats
from swtool.formats.gguf.writer import gguf_arch, gguf_names
from swtool.input_sums import InputSums, input_sums

MIN_DENSE_TOKENS = 16
"""llama-imatrix ignores dense products on fewer tokens than this (`src1->ne[1] < 16`)."""

UBATCH = 512
"""llama.cpp's default physical batch (-ub)."""


@dataclass
class Chunks:
    windows: torch.Tensor
    """(chunks, ctx) token ids as the model sees them (first token BOS where the vocabulary adds one)."""
    text_tokens: int
    """Tokens in the whole text (BOS included)."""


@dataclass
class ImatrixResult:
    model: str
    text: str
    output: str
    tensors: int
    chunks: int
    ctx: int
    tokens: int
    """Tokens run through the model (chunks x ctx)."""
    text_tokens: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def read_text(path: Path) -> str:
    """The text as llama.cpp's -f reads it: whole, with one trailing newline dropped."""
    text = read_utf8(path)
    text = text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise SwtoolError(f"{path}: the text is empty")
    return text


def tokenize(checkpoint: Checkpoint, text: str) -> tuple[list[int], int | None]:
    """Token ids as common_tokenize(add_special=true, parse_special=false) gives them, and the BOS id if one is added."""
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.encode_special_tokens = True  # "<|im_start|>" in the text is text, as without --parse-special
    probe, bare = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
    prefix = probe[: len(probe) - len(bare)] if probe[len(probe) - len(bare) :] == bare else []
    ids = prefix + text_ids(tokenizer, text, add_special_tokens=False)
    return ids, prefix[0] if len(prefix) == 1 else None


def cut_chunks(ids: list[int], ctx: int, chunks: int | None, bos: int | None) -> Chunks:
    """llama-imatrix's chunks of `ids`: needs 2 x ctx tokens, drops the tail, BOS first in every chunk where added."""
    if ctx < 2:
        raise SwtoolError("--ctx must be at least 2 tokens")
    if chunks is not None and chunks < 1:
        raise SwtoolError("--chunks must be at least 1")
    if len(ids) < 2 * ctx:
        raise SwtoolError(f"the text has {len(ids)} tokens; llama-imatrix needs at least 2 x ctx = {2 * ctx} for --ctx {ctx}")
    count = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    windows = torch.tensor(ids[: count * ctx], dtype=torch.int64).view(count, ctx).clone()
    if bos is not None:
        windows[:, 0] = bos
    return Chunks(windows, len(ids))


def collected_tokens(chunks: int, ctx: int, batch: int, ubatch: int = UBATCH) -> torch.Tensor:
    """(chunks, ctx) bool: the tokens llama-imatrix collects for dense weights with -c ctx -b batch -ub ubatch.

    llama-imatrix decodes max(1, batch // ctx) chunks per batch (each as its own sequence), or each
    chunk in pieces of `batch` tokens when batch < ctx; llama.cpp cuts every batch into micro-batches
    of at most `ubatch` tokens: consecutive tokens with one sequence, and with several (one KV stream
    each) an equal number of consecutive tokens from every sequence. A micro-batch of fewer than 16
    tokens is not collected.
    """
    n_seq = max(1, batch // ctx)
    batch = min(batch, n_seq * ctx)
    ubatch = min(ubatch, batch)
    keep = torch.ones(chunks, ctx, dtype=torch.bool)
    for first in range(0, chunks, n_seq):
        seqs = min(n_seq, chunks - first)
        for start in range(0, ctx, batch):
            size = min(ctx - start, batch)
            if n_seq == 1:  # split_simple: consecutive tokens of the one sequence
                for piece in range(start, start + size, ubatch):
                    if min(ubatch, start + size - piece) < MIN_DENSE_TOKENS:
                        keep[first, piece : start + size] = False
            else:  # split_equal: the same positions of every sequence
                step = max(1, ubatch // seqs)
                for piece in range(start, start + size, step):
                    if seqs * min(step, start + size - piece) < MIN_DENSE_TOKENS:
                        keep[first : first + seqs, piece : piece + step] = False
    return keep


def gguf_entries(names: dict[str, list[str]], sums: dict[str, InputSums]) -> dict[str, Entry]:
    """Canonical sums -> llama.cpp's entries under GGUF names (`names`: GGUF name -> its canonical names, see
    `gguf_out.gguf_names`); routed experts merged (one row each, zeros where no token went)."""
    entries = {}
    for stored, parts in names.items():
        found = [sums.get(name) for name in parts]
        if all(s is None for s in found):
            continue
        width = next(s for s in found if s is not None).in_sum2.numel()
        in_sum2 = np.zeros((len(parts), width), np.float32)
        in_sum = np.zeros((len(parts), width), np.float32)
        counts = np.zeros(len(parts), np.float32)
        for row, s in enumerate(found):
            if s is not None:
                in_sum2[row], in_sum[row], counts[row] = s.in_sum2.numpy(), s.in_sum.numpy(), s.count
        entries[stored] = Entry(in_sum2, counts, in_sum)
    for name, entry in imatrix_stats(entries).items():
        entries[name].stats = entry
    return entries


def chunk_count(entries: dict[str, Entry], ctx: int) -> int:
    """llama-imatrix's chunk count: the largest token count of any matrix, in chunks rounded to nearest."""
    largest = max((int(c) for e in entries.values() for c in e.counts), default=0)
    return (largest + ctx // 2) // ctx


def check_batch(batch: int, ubatch: int = UBATCH) -> None:
    for option, value in (("--batch", batch), ("--ubatch", ubatch)):
        if value < 1:
            raise SwtoolError(f"{option} must be at least 1")


def compute_imatrix(
    checkpoint: Checkpoint,
    chunks: Chunks,
    dataset: str,
    *,
    batch: int = 2048,
    ubatch: int = UBATCH,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    memory_limit: int = 8 << 30,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Imatrix:
    """The importance matrix of `checkpoint` over `chunks`, as llama-imatrix would compute it with -b batch -ub ubatch."""
    check_batch(batch, ubatch)
    names = gguf_names(checkpoint, gguf_arch(checkpoint))  # a model llama.cpp has no names for fails before the forward
    count, ctx = chunks.windows.shape
    keep = collected_tokens(count, ctx, batch, ubatch)
    per_forward = max(1, batch // ctx)
    sums = input_sums(checkpoint, chunks.windows, keep=None if bool(keep.all()) else keep, batch=per_forward,
                      dtype=dtype, device=device, memory_limit=memory_limit, progress=progress)
    entries = gguf_entries(names, sums)
    if not entries:
        raise SwtoolError("no tokens were collected (every micro-batch had fewer than 16 tokens); raise --ctx or --batch")
    return Imatrix(entries, [dataset], chunk_count(entries, ctx), ctx, metadata=dict(metadata or {}))


def imatrix(
    checkpoint: Checkpoint,
    text_path: Path,
    output: Path,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    batch: int = 2048,
    force: bool = False,
    provenance: Provenance | None = None,
    progress: Callable[[int, int], None] | None = None,
    **run,
) -> ImatrixResult:
    """Tokenize and cut the text, compute, and write `output` atomically; bad input fails before anything is written."""
    inputs = [checkpoint.path, *checkpoint.files, text_path]
    check_target(output, inputs, force)
    check_batch(batch, run.get("ubatch", UBATCH))
    gguf_names(checkpoint, gguf_arch(checkpoint))  # a model llama.cpp has no names for fails here, not after the forward
    ids, bos = tokenize(checkpoint, read_text(text_path))
    cut = cut_chunks(ids, ctx, chunks, bos)
    with atomic_output(output, directory=False, inputs=inputs, force=force) as temp:
        metadata = provenance.fields if provenance is not None else None
        result = compute_imatrix(checkpoint, cut, str(text_path), batch=batch, metadata=metadata, progress=progress, **run)
        write_imatrix(temp, result)
        if provenance is not None:
            provenance.seal(temp)
    count = cut.windows.shape[0]
    return ImatrixResult(str(checkpoint.path), str(text_path), str(output), len(result.entries), count, ctx, count * ctx, cut.text_tokens)


def imatrix_model(
    model: Path,
    output: Path,
    text: Path | None,
    builtin: bool,
    *,
    ahead: ReadAhead | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    batch: int = 2048,
    ubatch: int = UBATCH,
    force: bool = False,
    dtype_option: str = "fp32",
    **run,
) -> ImatrixResult:
    """`swtool imatrix`: check the output and the text before any work, open the model, compute and write."""
    if builtin == (text is not None):
        raise SwtoolError("give the calibration text: --text FILE, or --builtin for swtool's built-in English text")
    check_target(output, [model] + ([text] if text is not None else []), force)
    if text is None:
        text = builtin_text_path()
    elif not text.is_file():  # before its digest is taken
        raise SwtoolError(f"{text}: cannot read (no such file)")
    checkpoint = open_checkpoint(model)
    if ahead is not None:
        ahead.stop()
    options = {"ctx": ctx, "chunks": chunks, "batch": batch, "ubatch": ubatch, "dtype": dtype_option, "builtin": builtin}
    with Provenance("imatrix", options, [model, text]) as record:
        return imatrix(checkpoint, text, output, ctx=ctx, chunks=chunks, batch=batch, ubatch=ubatch, force=force, provenance=record, **run)
