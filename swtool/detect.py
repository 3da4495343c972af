"""Data-free super weight detection: spikes at down_proj outputs, traced to single weights, verified by effect.

Every pass streams the layers once with a batch of *variants* of the model;
a variant is a set of down_proj weights considered zeroed. Zeroing weight
[row, col] only removes `x[:, col] * W[row, col]` from output channel `row`,
so variants share the loaded weights and differ only in that subtraction.

1. Pass 1 runs the original model, records each layer's extremes, and takes a
   candidate from every layer whose output spike is massive relative to the
   layer's median magnitude: row = spike channel, col = the input channel that
   contributes most to it.
2. Each later pass restarts at the earliest candidate's layer (earlier hidden
   states are cached) with one variant per new candidate zeroed alone, plus one
   with it and the candidates that revealed it zeroed. Final logits measure
   each candidate's effect on the prompt's next-token predictions; spikes that
   remain in a variant at coordinates not yet examined become new candidates.
   A spike yields a candidate only if one weight contributes at least
   `min_share` of it (distributed spikes have no single culprit).
   With routed experts (Mixtral) every expert's down projection is examined
   on its own, over only the tokens the router sent to it; a candidate then
   names its expert (the "super expert").
3. It stops when no new candidate appears (or after `max_rounds`). A candidate is
   a super weight when zeroing it alone shifts the prompt's next-token
   distributions (mean KL divergence, nats) by at least `min_effect` and by at
   least `relative_effect` times the strongest candidate's shift. On SmolLM2 the
   true super weight shifts them by ~5 nats and raises Wikipedia perplexity
   7.5x; the next strongest spikes shift them by ~1.5 nats and change
   perplexity by under 1.5x: a single prompt is noisy, so the bar is relative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from swtool.checkpoint.base import Checkpoint
from swtool.forward import LayerStream

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
Coord = tuple[int, int, int]
"""(layer, row, col) of a down_proj weight, HF `nn.Linear` order."""
Key = tuple[int, int, int, int]
"""(layer, expert or -1 for a dense MLP, row, col): one down projection weight, experts included."""
DENSE = -1


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
    activation_after: float = float("nan")
    """|y[token, row]| at this layer with the weight zeroed."""
    is_super: bool = False
    expert: int | None = None

    @property
    def coord(self) -> Coord:
        return (self.layer, self.row, self.col)

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
    passes: int
    settings: dict = field(default_factory=dict)
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
            "passes": self.passes,
            "settings": self.settings,
        }


def _finite(value):
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass
class _Pass:
    """What one streamed pass saw: per variant, its layer stats, its spikes and the probed activation."""

    stats: list[list[LayerStats]]
    spikes: list[list[tuple]]
    probed: list[float]
    logits: torch.Tensor


class Detector:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        prompt: str = DEFAULT_PROMPT,
        min_ratio: float = 100.0,
        min_share: float = 0.3,
        min_effect: float = 0.5,
        relative_effect: float = 0.5,
        max_rounds: int = 4,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ):
        from swtool.tokenizer import encode

        self.checkpoint = checkpoint
        self.stream = LayerStream(checkpoint, dtype=dtype, device=device, recycle=True)
        self.prompt = prompt
        self.token_ids = torch.tensor([encode(checkpoint, prompt)])
        self.min_ratio = min_ratio
        self.min_share = min_share
        self.min_effect = min_effect
        self.relative_effect = relative_effect
        self.max_rounds = max_rounds
        self.ancestors: dict[Key, frozenset[Key]] = {}
        """For each candidate, the weights zeroed in the variant where its spike appeared."""
        self.progress = progress
        self.inputs: list[torch.Tensor] = []
        """Hidden state entering each layer in the original model (B=1), cached by pass 1."""

    # -- one streamed pass ------------------------------------------------------

    def _pass(self, variants: list[frozenset[Key]], start: int, probes: list[Candidate | None]) -> _Pass:
        """Run layers from `start` with one batch row per variant.

        `probes[v]` names a candidate whose spike value (at its layer, token and
        row) is read back from variant v, to show how far zeroing it lowered it.
        """
        batch = len(variants)
        first = self.inputs[start] if self.inputs else self.stream.embed(self.token_ids)
        h = first.expand(batch, -1, -1).clone()
        stats: list[list[LayerStats]] = [[] for _ in variants]
        spikes: list[list[tuple]] = [[] for _ in variants]
        probed = [float("nan")] * batch
        record_inputs = not self.inputs
        zeroed_at: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for v, keys in enumerate(variants):
            for layer, expert, row, col in keys:
                zeroed_at.setdefault((layer, expert), []).append((v, row, col))
        total = self.stream.config.num_layers
        for layer in self.stream.layers(start):
            if record_inputs:
                self.inputs.append(h[:1].clone())
            weights = self.stream.layer_weights(layer)

            def hook(layer_index: int, x: torch.Tensor, y: torch.Tensor, expert: int | None = None, routed: torch.Tensor | None = None) -> torch.Tensor:
                e = DENSE if expert is None else expert
                down = weights["down" if expert is None else f"down.{expert}"]
                y = y.clone()
                for v, row, col in zeroed_at.get((layer_index, e), []):
                    y[v, :, row] -= x[v, :, col] * down[row, col]
                for v in range(batch):
                    probe = probes[v]
                    if probe is not None and probe.key[:2] == (layer_index, e):
                        probed[v] = float(y[v, probe.token, probe.row])
                    # An expert is judged on the tokens routed to it; the other rows are zeros.
                    tokens = torch.arange(x.shape[1], device=x.device) if routed is None else routed[v].nonzero().flatten()
                    if not len(tokens):
                        continue
                    xv, yv = x[v, tokens], y[v, tokens]
                    stats[v].append(_layer_stats(layer_index, xv, yv, tokens, expert))
                    spike = self._spike(layer_index, e, xv, yv, tokens, down, variants[v])
                    if spike is not None:
                        spikes[v].append(spike)
                return y

            h = self.stream.run_layer(layer, h, weights, hook=hook)
            del weights
            if self.progress:
                self.progress(layer + 1, total)
        return _Pass(stats, spikes, probed, self.stream.logits(h))

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

    # -- the whole search -------------------------------------------------------

    def run(self) -> ScanResult:
        original = self._pass([frozenset()], 0, [None])
        original_logp = F.log_softmax(original.logits[0].float(), dim=-1)
        candidates: dict[Key, Candidate] = {}
        new = self._new_candidates(original.spikes[0], frozenset(), candidates, round_=1)
        passes = 1
        while new and passes <= self.max_rounds:
            # One variant per new candidate zeroed alone (its effect), and one with the
            # candidates that revealed it zeroed too (to look for what hides behind them).
            sources = [*new, *[c for c in new if self.ancestors[c.key]]]
            variants = [frozenset([c.key]) for c in new]
            variants += [self.ancestors[c.key] | {c.key} for c in new if self.ancestors[c.key]]
            start = min(key[0] for variant in variants for key in variant)
            result = self._pass(variants, start, [*new, *[None] * (len(variants) - len(new))])
            passes += 1
            for index, cand in enumerate(new):
                self._measure(cand, result.logits[index], original_logp)
                cand.activation_after = result.probed[index]
            # Only weights that matter are worth looking behind.
            new = [
                found
                for source, variant, spikes in zip(sources, variants, result.spikes)
                if source.effect >= self.min_effect
                for found in self._new_candidates(spikes, variant, candidates, round_=passes)
            ]
        strongest = max((c.effect for c in candidates.values() if c.effect == c.effect), default=0.0)
        bar = max(self.min_effect, self.relative_effect * strongest)
        for cand in candidates.values():
            cand.is_super = bool(cand.effect == cand.effect and cand.effect >= bar)
        return ScanResult(
            model=str(self.checkpoint.path),
            architecture=self.stream.config.model_type,
            prompt=self.prompt,
            tokens=int(self.token_ids.shape[1]),
            layers=original.stats[0],
            candidates=sorted(candidates.values(), key=lambda c: c.key),
            passes=passes,
            name=self.stream.config.name or (self.checkpoint.path.name if self.checkpoint.path.is_dir() else self.checkpoint.path.stem),
            settings={
                "min_ratio": self.min_ratio,
                "min_share": self.min_share,
                "min_effect": self.min_effect,
                "relative_effect": self.relative_effect,
                "effect_bar": bar,
                "max_rounds": self.max_rounds,
            },
        )

    def _new_candidates(self, spikes: list[tuple], zeroed: frozenset[Key], known: dict[Key, Candidate], round_: int) -> list[Candidate]:
        fresh = []
        for key, token, activation, x_value, ratio, share in spikes:
            if key in known or abs(share) < self.min_share:
                continue
            self.ancestors[key] = zeroed
            layer, e, row, col = key
            expert = None if e == DENSE else e
            down = self.stream.family.down_tensor(self.stream.config, layer, expert)
            cand = Candidate(
                layer=layer,
                tensor=self.checkpoint.stored_name(down),
                row=row,
                col=col,
                value=float(self.checkpoint.load(down, rows=[row])[0, col]),
                activation=activation,
                input=x_value,
                token=token,
                ratio=ratio,
                share=share,
                round=round_,
                expert=expert,
            )
            known[key] = cand
            fresh.append(cand)
        return fresh

    def _measure(self, cand: Candidate, logits: torch.Tensor, original_logp: torch.Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=-1)
        cand.effect = float((original_logp.exp() * (original_logp - logp)).sum(-1).mean())
        targets = self.token_ids[0, 1:]
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
