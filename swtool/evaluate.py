"""Perplexity, streamed layer by layer, with the paper's ablations and simulated W8A8 applied on the way.

GPTQ-style: the whole text is tokenized and cut into non-overlapping windows
of `ctx` tokens; the result is the mean next-token loss over every predicted
token of every window. Streaming inverts the usual loop: all windows go
through layer i (in batches) before layer i+1 is loaded, so memory holds the
layer being run and the next one loading (bf16/fp16 matrices stay 16-bit, each
widened to fp32 for its product in one reused buffer) plus the hidden states of
all windows (fp32, in memory or, past `memory_limit`, in an unlinked temporary
file). The LM head is streamed in vocabulary chunks with a running log-sum-exp,
so the full (windows x ctx x vocab) logits never exist.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from swtool.ablation import EditPlan, edit_tensor
from swtool.actquant import (
    SMOOTHED,
    ActivationQuantizer,
    InputMaxima,
    check_granularity,
    quant_levels,
    quantize_weights,
    smooth,
)
from swtool.data.text import read_utf8
from swtool.errors import SwtoolError
from swtool.families import family_of, linear_layers, linear_roles
from swtool.formats.base import Checkpoint, Held
from swtool.formats.open import open_checkpoint
from swtool.model.forward import InputHook, LayerStream, MlpHook
from swtool.model.nll import token_nll
from swtool.model.tokenizer import load_tokenizer, text_ids
from swtool.model.windows import WeightsHook, hidden_buffer, stream_windows
from swtool.readahead import ReadAhead
from swtool.supers import find_super_weights

RESTORE_RATIO = 100.0
"""A token carries the super activation where |value| >= this times the median |down_proj output| (scan's spike rule)."""


@dataclass
class Options:
    """What differs between the evaluated model and the checkpoint; all default to the plain model."""

    edit: EditPlan = field(default_factory=EditPlan)
    restore_super_act: bool = False
    w_bits: int | None = None
    a_bits: int | None = None
    a_granularity: str = "token"
    keep_super_act: bool = False
    smoothquant: float | None = None
    """SmoothQuant alpha; None for no smoothing."""
    calibration_windows: int = 8

    def __post_init__(self) -> None:

        if self.restore_super_act and not self.edit.zero_super:
            raise SwtoolError("--restore-super-act restores what --zero-super removed; give both")
        if self.keep_super_act and not self.a_bits:
            raise SwtoolError("--keep-super-act applies to activation quantization; give --a-bits too")
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise SwtoolError("--smoothquant alpha must be between 0 and 1")
        if self.calibration_windows < 1:
            raise SwtoolError("--calibration-windows must be at least 1")
        check_granularity(self.a_granularity)
        for bits in (self.w_bits, self.a_bits):
            if bits is not None:
                quant_levels(bits)

    def describe(self) -> dict:
        return {
            **self.edit.describe(),
            "restore_super_act": self.restore_super_act,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "a_granularity": self.a_granularity if self.a_bits else None,
            "keep_super_act": self.keep_super_act,
            "smoothquant": self.smoothquant,
            "calibration_windows": self.calibration_windows if self.smoothquant is not None else 0,
        }


@dataclass
class EvalResult:
    model: str
    text: str
    tokens: int
    windows: int
    ctx: int
    nll: float
    settings: dict

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_json(self) -> dict:
        return {"model": self.model, "text": self.text, "tokens": self.tokens, "windows": self.windows, "ctx": self.ctx, "nll": self.nll, "ppl": self.ppl, "settings": self.settings}


def cut_windows(ids: list[int], ctx: int) -> torch.Tensor:
    """All non-overlapping windows of `ctx` tokens (the incomplete tail is dropped, as GPTQ does)."""
    if ctx < 2:
        raise SwtoolError("--ctx must be at least 2 tokens")
    count = len(ids) // ctx
    if count == 0:
        raise SwtoolError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    return torch.tensor(ids[: count * ctx], dtype=torch.int64).view(count, ctx)




def restore_hook(plan: EditPlan, originals: dict[Held, float], layers: dict[str, int]) -> MlpHook:
    """Write the original super activation back where the super weight was zeroed (the paper's "Prune SW, +SA").

    Zeroing W[row, col] removes x[:, col] * W[row, col] from output channel
    `row`; it is added back only at the tokens where the original value is a
    super activation (massive against the layer's median), not everywhere,
    which would just be the original model.
    """
    down_by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for s in plan.supers:
        down_by_layer.setdefault(layers[s.tensor], []).append((s.row, s.col, originals[s]))

    def hook(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if layer not in down_by_layer:
            return None
        y = y.clone()
        median = y.abs().flatten(1).median(dim=1).values[:, None]
        for row, col, weight in down_by_layer[layer]:
            original = y[:, :, row] + x[:, :, col] * weight
            spike = original.abs() >= RESTORE_RATIO * median
            y[:, :, row] = torch.where(spike, original, y[:, :, row])
        return y

    return hook


def weights_hook(stream: LayerStream, options: Options, maxima: dict[tuple[int, str], torch.Tensor] | None) -> WeightsHook | None:
    """Edits, then SmoothQuant folding, then weight fake-quantization: in that order, per layer."""

    config = stream.config
    roles = linear_roles(stream.family, config)
    if not (options.edit.active or maxima is not None or options.w_bits):
        return None

    def hook(layer: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = stream.family.layer_tensors(config, layer)
        linear = {names[r] for r in roles}
        if options.edit.active:
            weights = {
                role: edit_tensor(options.edit, names[role], w, role in roles) if options.edit.touches(names[role], linear) else w
                for role, w in weights.items()
            }
        if maxima is not None:
            weights = smooth(weights, {role: m for (i, role), m in maxima.items() if i == layer}, options.smoothquant)
        if options.w_bits:
            weights = quantize_weights(weights, roles, options.w_bits)
        return weights

    return hook


def chain(first: WeightsHook, second: WeightsHook) -> WeightsHook:
    return lambda layer, weights: second(layer, first(layer, weights))


def check_smoothable(checkpoint: Checkpoint) -> None:
    """SmoothQuant's factors fold into RMSNorm weights ahead of separate q/k/v and gate/up projections."""

    family = family_of(checkpoint.config)
    roles = family.layer_tensors(checkpoint.config, 0)
    needed = {fold for fold, _ in SMOOTHED.values()} | {t for _, targets in SMOOTHED.values() for t in targets}
    if family.norm != "rms" or not family.pre_norm or not needed <= set(roles):
        raise SwtoolError(f"--smoothquant supports pre-norm RMSNorm families with separate q/k/v and gate/up projections, not {checkpoint.config.model_type}")


def calibrate(checkpoint: Checkpoint, windows: torch.Tensor, batch: int, dtype: torch.dtype, device: str, memory_limit: int) -> dict[tuple[int, str], torch.Tensor]:
    """Per-channel max |input| of each smoothed linear layer, from the full-precision model on `windows`."""

    recorder = InputMaxima()
    stream = LayerStream(checkpoint, dtype=dtype, device=device, input_hook=recorder)
    with hidden_buffer((*windows.shape, checkpoint.config.hidden_size), memory_limit) as hidden:
        stream_windows(stream, windows, hidden, batch)
    return recorder.maxima


def perplexity(
    checkpoint: Checkpoint,
    windows: torch.Tensor,
    options: Options | None = None,
    *,
    calibration: torch.Tensor | None = None,
    batch: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    memory_limit: int = 8 << 30,
    transform: WeightsHook | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Mean next-token NLL (nats) of the model, modified per `options`, over `windows` (count, ctx).

    `transform`, if given, is applied to each layer's weights after the options
    (a library caller's own weight quantizer, for instance).
    """

    options = options or Options()
    maxima = None
    if options.smoothquant is not None:
        check_smoothable(checkpoint)
        maxima = calibrate(checkpoint, calibration if calibration is not None else windows, batch, dtype, device, memory_limit)
    input_hook: InputHook | None = ActivationQuantizer(options.a_bits, options.a_granularity, options.keep_super_act) if options.a_bits else None
    stream = LayerStream(checkpoint, dtype=dtype, device=device, input_hook=input_hook)
    mlp_hook = None
    if options.restore_super_act:
        if checkpoint.config.num_experts:
            raise SwtoolError("--restore-super-act supports dense MLPs, not routed experts")
        layers = linear_layers(checkpoint.config)
        originals = {s: checkpoint.value(s) for s in options.edit.supers}
        mlp_hook = restore_hook(options.edit, originals, layers)
    hook = weights_hook(stream, options, maxima)
    if transform is not None:
        hook = chain(hook, transform) if hook is not None else transform
    with hidden_buffer((*windows.shape, checkpoint.config.hidden_size), memory_limit) as hidden:
        stream_windows(stream, windows, hidden, batch, hook, mlp_hook, progress)
        nll = token_nll(stream, windows, hidden, batch)
    if progress:
        progress(checkpoint.config.num_layers + 1, checkpoint.config.num_layers + 1)
    return float(nll.double().mean())


def evaluate(
    checkpoint: Checkpoint,
    text_path: Path,
    options: Options | None = None,
    *,
    ctx: int = 2048,
    max_windows: int | None = None,
    **run,
) -> EvalResult:
    """Perplexity of `checkpoint` on a UTF-8 text file; SmoothQuant calibrates on windows after the evaluated ones."""
    options = options or Options()
    ids = text_ids(load_tokenizer(checkpoint), read_utf8(text_path))
    ctx = min(ctx, checkpoint.config.max_position_embeddings)
    tokens, every = len(ids), cut_windows(ids, ctx)
    del ids  # a Python list, about 36 bytes a token: not kept through the layers
    if max_windows is not None and max_windows < 1:
        raise SwtoolError("--max-windows must be at least 1")
    used = len(every) if max_windows is None else min(max_windows, len(every))
    rest = every[used:]
    calibration = (rest if len(rest) else every)[: options.calibration_windows]
    nll = perplexity(checkpoint, every[:used], options, calibration=calibration, **run)
    settings = {**options.describe(), "calibration_overlaps_eval": options.smoothquant is not None and not len(rest)}
    return EvalResult(str(checkpoint.path), str(text_path), tokens, used, ctx, nll, settings)


def evaluate_model(
    model: Path,
    text_path: Path,
    options: Options,
    super_file: str | None,
    *,
    ahead: ReadAhead | None = None,
    stdin: TextIO | None = None,
    **run,
) -> EvalResult:
    """`swtool eval`: open the model, find the super weights an ablation needs, measure perplexity."""
    if run.get("batch", 1) < 1:
        raise SwtoolError("--batch must be at least 1")
    checkpoint = open_checkpoint(model)
    if ahead is not None:
        ahead.stop()
    edit = options.edit
    if edit.active or options.restore_super_act or super_file is not None:
        required = edit.factor is not None or options.restore_super_act
        supers = find_super_weights(checkpoint, super_file, stdin or sys.stdin, required=required, dtype=run.get("dtype", torch.float32), device=run.get("device", "cpu"))
        options = dataclasses.replace(options, edit=EditPlan(tuple(supers), edit.zero_super, edit.scale_super, edit.zero_outliers))
    return evaluate(checkpoint, text_path, options, **run)
