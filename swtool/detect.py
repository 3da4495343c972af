"""Data-free super weight detection: spikes at down_proj outputs, traced to single weights, verified by effect.

One streamed pass runs a growing batch of *variants* of the model; a variant
is a set of down projection weights considered zeroed. Zeroing weight
[row, col] only removes `x[:, col] * W[row, col]` from output channel `row`,
so variants share the loaded weights and differ only in that subtraction. A
variant that zeroes a weight of layer L equals its parent up to L, so it is
forked from its parent's input to L when the pass finds the weight there, and
layer L is run again for the new rows with the weights already in memory.
Each layer is therefore read once, and one matrix product per projection
serves every variant; running the whole layer (not patching its output) keeps
post-MLP norms and routed experts exact.

1. Row 0 is the original model. It records each layer's extremes, and a layer
   whose output spike is massive relative to its median magnitude yields a
   candidate: row = spike channel, col = the input channel that contributes
   most to it. A spike yields a candidate only if one weight contributes at
   least `min_share` of it (distributed spikes have no single culprit). With
   routed experts (Mixtral) every expert's down projection is examined on its
   own, over only the tokens the router sent to it; a candidate then names its
   expert (the "super expert").
2. Each candidate forks a variant with it zeroed alone (forked from the
   original row; its final logits measure the candidate's effect on the
   prompt's next-token predictions) and, if it was found in a variant, one
   with that variant's weights zeroed too (to look for what hides behind
   them). Spikes in a variant at coordinates not yet examined become
   candidates of the next round, up to `max_rounds`; at the end, candidates
   found behind a weight whose own effect is below `min_effect` are dropped
   (only weights that matter are worth looking behind).
3. The prompt's effect ranks candidates but does not decide: over a few
   tokens it is dominated by the first positions, where zeroing any weight
   behind a massive activation moves the attention sink (a Qwen2.5 weight
   shifted a prompt by 2 nats and Wikipedia perplexity by 1.3 %). The
   candidates whose effect reaches `min_effect` (the screen), at most
   `max_verify` of them, strongest first, are verified by perplexity in one
   more streamed pass (`swtool.verify`) on the built-in text or the user's.
   A candidate is a super weight when zeroing it alone multiplies that
   perplexity by at least `min_ppl_ratio`. On SmolLM2 the super weight does
   so 6.8x on the built-in text (8.1x on Wikipedia); the other candidates
   change it by under 1.5x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from pathlib import Path

from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint, Held
from swtool.model.forward import LayerStream
from swtool.verify import BUILTIN, DENSE, Key, compute_dtype, ppl_ratios, read_text, window
from swtool.workers import parallel_chunks

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


@dataclass
class LayerStats:
    layer: int
    in_max: float
    in_channel: int
    in_token: int
    out_max: float
    out_channel: int
    out_token: int
    out_median: float
    expert: int | None = None
    """The routed expert these statistics cover (its tokens only); None for a dense MLP."""

    @property
    def ratio(self) -> float:
        return self.out_max / max(self.out_median, 1e-12)


@dataclass
class Candidate:
    layer: int
    tensor: str
    row: int
    col: int
    value: float
    """The weight W[row, col]."""
    activation: float
    """The spike y[token, row] at the down_proj output where the weight was found."""
    input: float
    """x[token, col], the down_proj input that the weight multiplies."""
    token: int
    ratio: float
    """Spike magnitude over the layer's median |output|."""
    share: float
    """Fraction of the spike that this one weight contributes."""
    round: int
    effect: float = float("nan")
    """Mean KL divergence (nats) of next-token distributions when this weight alone is zeroed."""
    loss_ratio: float = float("nan")
    """Prompt next-token loss with the weight zeroed over the original loss."""
    ppl_ratio: float = float("nan")
    """Perplexity of the verification text with this weight alone zeroed over the original's (NaN: not verified)."""
    unverified: str | None = None
    """Why the candidate was not verified by perplexity (None when it was)."""
    activation_after: float = float("nan")
    """|y[token, row]| at this layer with the weight zeroed."""
    is_super: bool = False
    expert: int | None = None

    @property
    def key(self) -> Key:
        return (self.layer, DENSE if self.expert is None else self.expert, self.row, self.col)


@dataclass
class ScanResult:
    model: str
    architecture: str
    prompt: str
    tokens: int
    layers: list[LayerStats]
    candidates: list[Candidate]
    variants: int
    """Batch rows of the single streamed pass: the original model plus one per verification variant."""
    settings: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    """The perplexity pass: the text, its tokens, the dtype, the original model's perplexity, batch rows (0: not run)."""
    name: str = ""
    """The model's own name (HF `_name_or_path`, GGUF `general.name`), or the file name without one."""

    @property
    def super_weights(self) -> list[Candidate]:
        return [c for c in self.candidates if c.is_super]

    def to_json(self) -> dict:
        def row(c: Candidate) -> dict:
            return {k: _finite(v) for k, v in asdict(c).items()}

        return {
            "model": self.model,
            "name": self.name,
            "architecture": self.architecture,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "layers": [{**asdict(s), "ratio": _finite(s.ratio)} for s in self.layers],
            "super_weights": [row(c) for c in self.super_weights],
            "candidates": [row(c) for c in self.candidates],
            "variants": self.variants,
            "verification": self.verification,
            "settings": self.settings,
        }


def _finite(value):
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass(frozen=True)
class _Variant:
    """One batch row of the pass: the weights it zeroes, and why it exists."""

    zeroed: frozenset[Key]
    source: Candidate | None
    """The candidate this row measures or looks behind (None for the original model)."""
    measures: bool
    """True for the row with `source` zeroed alone: its logits give the source's effect."""


class Detector:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        prompt: str = DEFAULT_PROMPT,
        min_ratio: float = 100.0,
        min_share: float = 0.3,
        min_effect: float = 0.5,
        min_ppl_ratio: float = 2.0,
        max_verify: int = 3,
        verify_text: Path | None = None,
        verify_tokens: int | None = None,
        max_rounds: int = 4,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ):
        from swtool.model.tokenizer import encode

        self.checkpoint = checkpoint
        self.stream = LayerStream(checkpoint, dtype=dtype, device=device)
        self.prompt = prompt
        self.token_ids = torch.tensor([encode(checkpoint, prompt)])
        self.min_ratio = min_ratio
        self.min_share = min_share
        self.min_effect = min_effect
        if max_verify < 1:
            raise SwtoolError("--max-verify must be at least 1 (no candidate is a super weight unverified)")
        if not min_ppl_ratio > 1:
            raise SwtoolError("--min-ppl-ratio must be above 1")
        self.min_ppl_ratio = min_ppl_ratio
        self.max_verify = max_verify
        self.verify_source = BUILTIN if verify_text is None else str(verify_text)
        # Read and tokenized now, so a bad file fails before the pass, not after it.
        self.verify_tokens = window(checkpoint, read_text(verify_text), self.verify_source, verify_tokens)
        self.dtype = dtype
        self.device = device
        self.max_rounds = max_rounds
        self.progress = progress
        self.found_behind: dict[Key, Candidate | None] = {}
        """For each candidate, the candidate whose variant revealed it (None: the original model)."""

    # -- the streamed pass -------------------------------------------------------

    def run(self) -> ScanResult:
        # The pass multiplies a few dozen rows at most: split across intra-op threads, every small
        # op pays a fork and join (on SmolLM2 under load, 48 s with two threads against 8 s with
        # one). So torch runs on one thread; the big products of 16-bit weights go to the
        # chunk workers in bands (`forward.product`), and the loaders read the next layer.
        with parallel_chunks():
            result = self._run()
        # The verification multiplies hundreds of rows: torch's own threads suit it.
        self._verify(result)
        return result

    def _run(self) -> ScanResult:
        variants = [_Variant(frozenset(), None, measures=False)]
        candidates: dict[Key, Candidate] = {}
        stats: list[LayerStats] = []
        h = self.stream.embed(self.token_ids)
        total = self.stream.config.num_layers
        self.stream.expect_rows(h.shape[0] * h.shape[1])
        for layer, weights in self.stream.walk():
            inputs, outputs, first = h, [], 0
            while first < len(variants):
                forks: list[tuple[int, _Variant]] = []
                hook = self._hook(weights, variants, first, stats, candidates, forks)
                outputs.append(self.stream.run_layer(layer, inputs[first:], weights, hook=hook))
                # Forked rows enter this layer as their parent did, and run it with their weight zeroed.
                first = len(variants)
                variants += [variant for _, variant in forks]
                if forks:
                    inputs = torch.cat([inputs, inputs[[parent for parent, _ in forks]]])
            h = torch.cat(outputs)
            self.stream.expect_rows(h.shape[0] * h.shape[1])  # forks add rows; the loads already started keep their type
            if self.progress:
                self.progress(layer + 1, total)
        logits = self.stream.logits(h)
        original_logp = F.log_softmax(logits[0].float(), dim=-1)
        for index, variant in enumerate(variants):
            if variant.measures:
                self._measure(variant.source, logits[index], original_logp)
        kept = {key: cand for key, cand in candidates.items() if self._worth_reporting(key)}
        return ScanResult(
            model=str(self.checkpoint.path),
            architecture=self.stream.config.model_type,
            prompt=self.prompt,
            tokens=int(self.token_ids.shape[1]),
            layers=stats,
            candidates=sorted(kept.values(), key=lambda c: c.key),
            variants=len(variants),
            name=self.stream.config.name or (self.checkpoint.path.name if self.checkpoint.path.is_dir() else self.checkpoint.path.stem),
            settings={
                "min_ratio": self.min_ratio,
                "min_share": self.min_share,
                "min_effect": self.min_effect,
                "min_ppl_ratio": self.min_ppl_ratio,
                "max_verify": self.max_verify,
                "max_rounds": self.max_rounds,
            },
        )

    def _verify(self, result: ScanResult) -> None:
        """Screen the candidates by effect, verify the strongest by perplexity, and give the verdict."""
        screened = sorted((c for c in result.candidates if c.effect >= self.min_effect), key=lambda c: -c.effect)
        chosen = screened[: self.max_verify]
        for cand in result.candidates:
            if cand.effect != cand.effect:
                cand.unverified = f"effect not measured (found in round {cand.round}, beyond max_rounds)"
            elif cand.effect < self.min_effect:
                cand.unverified = f"effect below min_effect {self.min_effect:g} nats"
            elif cand not in chosen:
                cand.unverified = f"not among the {self.max_verify} strongest effects (max_verify)"
        verification = {"text": self.verify_source, "tokens": int(self.verify_tokens.shape[1]), "dtype": None, "ppl": None, "rows": 0}
        if chosen:
            dtype = compute_dtype(self.dtype)
            ppl, ratios = ppl_ratios(self.checkpoint, self.verify_tokens, [c.key for c in chosen], dtype=dtype, device=self.device, progress=self.progress)
            for cand in chosen:
                cand.ppl_ratio = ratios[cand.key]
                cand.is_super = cand.ppl_ratio >= self.min_ppl_ratio
            verification.update(dtype=str(dtype).removeprefix("torch."), ppl=ppl, rows=1 + len(chosen))
        result.verification = verification

    def _hook(
        self,
        weights: dict[str, torch.Tensor],
        variants: list[_Variant],
        first: int,
        stats: list[LayerStats],
        candidates: dict[Key, Candidate],
        forks: list[tuple[int, _Variant]],
    ) -> Callable[..., torch.Tensor]:
        """The down projection hook for one run of a layer over the variants numbered `first` on.

        It applies each row's zeroed weights, records the original model's statistics,
        turns spikes into candidates and appends, for each, the rows to fork as
        (the parent variant's number, new variant).
        """
        batch = variants[first:]

        def hook(layer: int, x: torch.Tensor, y: torch.Tensor, expert: int | None = None, routed: torch.Tensor | None = None) -> torch.Tensor:
            e = DENSE if expert is None else expert
            down = weights["down" if expert is None else f"down.{expert}"]
            y = y.clone()
            for b, variant in enumerate(batch):
                for z_layer, z_expert, row, col in variant.zeroed:
                    if (z_layer, z_expert) == (layer, e):
                        y[b, :, row] -= x[b, :, col] * down[row, col]
            for b, variant in enumerate(batch):
                probe = variant.source
                if variant.measures and probe.key[:2] == (layer, e):
                    probe.activation_after = float(y[b, probe.token, probe.row])
                # An expert is judged on the tokens routed to it; the other rows are zeros.
                tokens = torch.arange(x.shape[1], device=x.device) if routed is None else routed[b].nonzero().flatten()
                if not len(tokens):
                    continue
                xv, yv = x[b, tokens], y[b, tokens]
                if first + b == 0:
                    stats.append(_layer_stats(layer, xv, yv, tokens, expert))
                spike = self._spike(layer, e, xv, yv, tokens, down, variant.zeroed)
                cand = self._new_candidate(spike, variant, candidates) if spike else None
                if cand is None or cand.round > self.max_rounds:
                    continue
                forks.append((0, _Variant(frozenset([cand.key]), cand, measures=True)))
                if variant.zeroed:
                    forks.append((first + b, _Variant(variant.zeroed | {cand.key}, cand, measures=False)))
            return y

        return hook

    def _worth_reporting(self, key: Key) -> bool:
        """Found in the original model, or behind a weight that matters and is itself worth reporting."""
        source = self.found_behind[key]
        return source is None or (source.effect >= self.min_effect and self._worth_reporting(source.key))

    def _spike(self, layer: int, expert: int, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, down: torch.Tensor, zeroed: frozenset[Key]) -> tuple | None:
        """The spike of one variant's down output (rows = `tokens` of the prompt), traced to its largest contributor."""
        magnitude = y.abs()
        median = float(magnitude.median())
        peak = float(magnitude.max())
        if peak < self.min_ratio * max(median, 1e-12):
            return None
        index, row = divmod(int(magnitude.argmax()), magnitude.shape[1])
        contribution = x[index] * down[row]
        for z_layer, z_expert, z_row, z_col in zeroed:
            if (z_layer, z_expert, z_row) == (layer, expert, row):
                contribution[z_col] = 0
        col = int(contribution.abs().argmax())
        share = float(contribution[col] / y[index, row])
        return ((layer, expert, row, col), int(tokens[index]), float(y[index, row]), float(x[index, col]), peak / max(median, 1e-12), share)

    def _new_candidate(self, spike: tuple, variant: _Variant, known: dict[Key, Candidate]) -> Candidate | None:
        """The spike's weight as a candidate found in `variant`; None if already examined or if it carries too small a share."""
        key, token, activation, x_value, ratio, share = spike
        if key in known or abs(share) < self.min_share:
            return None
        self.found_behind[key] = variant.source
        layer, e, row, col = key
        expert = None if e == DENSE else e
        down = self.stream.family.down_tensor(self.stream.config, layer, expert)
        known[key] = Candidate(
            layer=layer,
            tensor=self.checkpoint.stored_name(down),
            row=row,
            col=col,
            value=self.checkpoint.value(Held(down, row, col)),
            activation=activation,
            input=x_value,
            token=token,
            ratio=ratio,
            share=share,
            round=1 if variant.source is None else variant.source.round + 1,
            expert=expert,
        )
        return known[key]

    def _measure(self, cand: Candidate, logits: torch.Tensor, original_logp: torch.Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=-1)
        cand.effect = float((original_logp.exp() * (original_logp - logp)).sum(-1).mean())
        targets = self.token_ids[0, 1:].to(logp.device)
        if len(targets):
            before = -original_logp[:-1].gather(-1, targets[:, None]).mean()
            after = -logp[:-1].gather(-1, targets[:, None]).mean()
            cand.loss_ratio = float(after / before)


def _layer_stats(layer: int, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, expert: int | None) -> LayerStats:
    """Extremes of one down projection's input and output; rows of x and y are the prompt's `tokens`."""
    xa, ya = x.abs(), y.abs()
    x_index, x_channel = divmod(int(xa.argmax()), xa.shape[1])
    y_index, y_channel = divmod(int(ya.argmax()), ya.shape[1])
    return LayerStats(
        layer=layer,
        in_max=float(xa.max()),
        in_channel=x_channel,
        in_token=int(tokens[x_index]),
        out_max=float(ya.max()),
        out_channel=y_channel,
        out_token=int(tokens[y_index]),
        out_median=float(ya.median()),
        expert=expert,
    )


def scan(checkpoint: Checkpoint, **options) -> ScanResult:
    return Detector(checkpoint, **options).run()
