"""swtool's own minimal transformer forward, run one decoder layer at a time.

`LayerStream` loads one layer's tensors from a checkpoint, runs them on the
current hidden states and lets them go, so memory holds one layer plus the
activations. Family differences are the switches on `Family` and the options
on `ModelConfig`; the maths reads top to bottom: embed (scaled for Gemma), then
per layer [norm] -> attention -> [post-norm] -> residual -> [norm] -> gated MLP
or routed experts -> [post-norm] -> residual, then final norm, head and
optional soft-capping.

`MlpHook` sees each down projection's input and output (and may change the
output): detection records spikes there, and the verification pass subtracts
one weight's contribution per batch variant there. For routed experts it is
called once per expert with `expert=E` and `routed`, a (B,T) mask of the tokens
sent to that expert; the other tokens' rows of the input and output are zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from swtool import native, workers
from swtool.errors import SwtoolError
from swtool.families.rope import apply_rope, inverse_frequencies
from swtool.formats.base import Checkpoint
from swtool.model.stream import SMALL_BATCH_ROWS, WeightStream

MlpHook = Callable[..., torch.Tensor | None]
"""(layer, down_proj input (B,T,I), down_proj output (B,T,H)[, expert=E, routed=mask]) -> replacement output or None."""

InputHook = Callable[[int, str, torch.Tensor], torch.Tensor]
"""(layer, role such as "q", "down" or "down.3", input of that linear layer) -> the input to use (e.g. fake-quantized)."""

PRODUCT_BAND_ROWS = 512
"""Weight rows per work item of `product`: enough work (~1 M weights) to amortise a hand-off to a worker."""

LAYER_NORM_EPS = 1e-5
"""OLMo's parameter-free LayerNorm uses a fixed epsilon (its config has none)."""

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class WideBuffer:
    """Where a 16-bit matrix is widened to the compute dtype for one product: one buffer, reused.

    Why: a layer kept in its 16-bit storage type takes half the memory of a float32 one, but
    torch multiplies many rows fastest in float32. Widening each matrix into fresh memory would
    fault in a matrix's worth of new pages for every product and leave the allocator's heap
    fragmented (memory the process keeps); widening into the same buffer every time costs one
    copy. The view `widen` returns is valid until its next call.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def widen(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        count = weight.numel()
        if self._flat is None or self._flat.numel() < count or self._flat.dtype != dtype or self._flat.device != weight.device:
            self._flat = None  # the old buffer goes before the new one is allocated
            self._flat = torch.empty(count, dtype=dtype, device=weight.device)
        return self._flat[:count].view(weight.shape).copy_(weight)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, wide: WideBuffer | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), where weight may be kept in 16 bits while x is float32.

    A few rows against a 16-bit matrix go to the C kernel, which reads the weights in place
    instead of writing and rereading a float32 copy (this product is bound by memory traffic).
    Inside `workers.parallel_chunks()` bands of the weight's rows go to the worker threads.
    Otherwise the matrix is widened to x's dtype first, into `wide` where given (the values,
    hence the product, are the same either way: widening 16-bit floats is exact).
    """
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    lib = native.product_kernels()
    if lib is None or rows > SMALL_BATCH_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or not weight.is_contiguous():
        return F.linear(x, wide.widen(weight, x.dtype) if wide is not None else weight.to(x.dtype), bias)
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    out_features, in_features = weight.shape
    y = torch.empty(rows, out_features)
    code = native.dtype_code(weight.dtype)

    def band(start: int) -> None:
        stop = min(start + PRODUCT_BAND_ROWS, out_features)
        lib.linear_half(flat.data_ptr(), rows, in_features, weight[start].data_ptr(), code, stop - start, y[:, start].data_ptr(), out_features)

    workers.run_chunks(band, range(0, out_features, PRODUCT_BAND_ROWS))
    y = y.view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """True where query i may attend key j: j <= i, and within the sliding window if any."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    return allowed


class LayerStream(WeightStream):
    """A checkpoint walked one layer at a time on a device, computing in one dtype (matrices may stay
    in their 16-bit storage type for small batches, see `expect_rows`)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        input_hook: InputHook | None = None,
    ):
        super().__init__(checkpoint, dtype, device)
        self.input_hook = input_hook
        self.wide = WideBuffer()
        self.activation = ACTIVATIONS[self.family.activation]
        self.rope_freqs = checkpoint.load("rope_freqs.weight") if checkpoint.has("rope_freqs.weight") else None
        self.inv_freq, self.attention_factor = inverse_frequencies(self.config, self.rope_freqs)
        self.local_inv_freq = None
        self._rope_tables: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.config.local_rope_theta is not None and self.config.sliding_window:
            self.local_inv_freq, _ = inverse_frequencies(self.config, theta=self.config.local_rope_theta)

    # -- pieces -----------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B,T,H) reading only the embedding rows of the tokens present."""
        unique, inverse = torch.unique(token_ids, return_inverse=True)
        if int(unique.max()) >= self.config.vocab_size or int(unique.min()) < 0:
            raise SwtoolError("token id outside the model's vocabulary (tokenizer and model disagree)")
        rows = self.checkpoint.load(self.family.global_tensors(self.config)["embed"], self.dtype, rows=unique.numpy())
        if self.family.embed_scale:  # Gemma: the scale is rounded to the compute dtype first, as transformers does
            rows = rows * torch.tensor(self.config.hidden_size**0.5, dtype=self.dtype)
        return rows.to(self.device)[inverse]

    def is_sliding(self, layer: int) -> bool:
        c = self.config
        return bool(c.sliding_window) and (not c.sliding_layers or c.sliding_layers[layer])

    def rope(self, length: int, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, rotary_dim) for `layer` (sliding-window layers may use their own base).

        Kept per (length, base): every layer of a pass asks for the same tables, and their
        sines and cosines cost as much as a layer's attention over a short window."""
        local = layer is not None and self.local_inv_freq is not None and self.is_sliding(layer)
        if (length, local) not in self._rope_tables:
            self._rope_tables[(length, local)] = self._rope_table(length, local)
        return self._rope_tables[(length, local)]

    def _rope_table(self, length: int, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if local:
            inv, factor = self.local_inv_freq, 1.0
        elif (self.config.rope_scaling or {}).get("rope_type") == "longrope":
            inv, factor = inverse_frequencies(self.config, self.rope_freqs, length=length)
        else:
            inv, factor = self.inv_freq, self.attention_factor
        positions = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(positions, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * factor).to(self.device, self.dtype)
        sin = (emb.sin() * factor).to(self.device, self.dtype)
        return cos, sin

    def norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The family's norm: RMSNorm by w, RMSNorm by 1 + w (Gemma), or LayerNorm without parameters (OLMo)."""
        kind = self.family.norm
        if kind == "layer":
            return F.layer_norm(x.float(), x.shape[-1:], eps=LAYER_NORM_EPS).to(x.dtype)
        if weight is None:
            raise SwtoolError(f"{self.checkpoint.path}: a norm weight is missing")
        return rms_norm(x, 1 + weight if kind == "rms1p" else weight, self.config.norm_eps)

    def linear(self, layer: int, role: str, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every projection goes through here, so one hook can see (and fake-quantize) every linear input."""
        if self.input_hook is not None:
            x = self.input_hook(layer, role, x)
        return product(x, w[role], w.get(role + "_bias"), self.wide)

    def attention(self, layer: int, x: torch.Tensor, w: dict[str, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, length, _ = x.shape
        if "qkv" in w:  # Phi-3: one fused projection, rows ordered q, k, v
            q, k, v = self.linear(layer, "qkv", x, w).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        else:
            q, k, v = (self.linear(layer, role, x, w) for role in ("q", "k", "v"))
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        if self.family.qk_norm == "full":
            q, k = self.norm(q, w["q_norm"]), self.norm(k, w["k_norm"])
        q = q.view(batch, length, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if self.family.qk_norm == "head":
            q, k = self.norm(q, w["q_norm"]), self.norm(k, w["k_norm"])
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        groups = c.num_heads // c.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scale = c.query_scale if c.query_scale is not None else c.head_dim**-0.5
        if c.attn_softcap:  # Gemma-2: cap * tanh(scores / cap) before the mask, which SDPA cannot do
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
            scores = c.attn_softcap * torch.tanh(scores / c.attn_softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.linear(layer, "o", out.transpose(1, 2).reshape(batch, length, c.num_heads * c.head_dim), w)

    def mlp(self, layer: int, x: torch.Tensor, w: dict[str, torch.Tensor], hook: MlpHook | None) -> torch.Tensor:
        if "router" in w:
            return self.experts(layer, x, w, hook)
        if "gate_up" in w:  # Phi-3: one fused projection, gate rows first
            gate, up = self.linear(layer, "gate_up", x, w).chunk(2, dim=-1)
        else:
            gate, up = self.linear(layer, "gate", x, w), self.linear(layer, "up", x, w)
        inner = self.activation(gate).mul_(up)
        del gate, up  # two (B,T,I) tensors fewer alive for the down projection, the layer's peak
        out = self.linear(layer, "down", inner, w)
        if hook is not None:
            replaced = hook(layer, inner, out)
            if replaced is not None:
                out = replaced
        return out

    def experts(self, layer: int, x: torch.Tensor, w: dict[str, torch.Tensor], hook: MlpHook | None) -> torch.Tensor:
        """Routed experts as Mixtral: softmax over router logits, top-k, weights renormalised to sum to 1."""
        batch, length, hidden = x.shape
        flat = x.reshape(-1, hidden)
        probs = F.softmax(self.linear(layer, "router", flat, w).float(), dim=-1)
        top, chosen = torch.topk(probs, self.config.experts_per_token, dim=-1)
        top = (top / top.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for expert in range(self.config.num_experts):
            tokens, slot = torch.where(chosen == expert)
            if not len(tokens):
                continue
            e = f".{expert}"
            inner = self.activation(self.linear(layer, "gate" + e, flat[tokens], w)) * self.linear(layer, "up" + e, flat[tokens], w)
            y = self.linear(layer, "down" + e, inner, w)
            if hook is not None:
                routed = torch.zeros(batch * length, dtype=torch.bool, device=x.device)
                routed[tokens] = True
                dense_in = inner.new_zeros(batch * length, inner.shape[-1]).index_copy(0, tokens, inner)
                dense_out = y.new_zeros(batch * length, hidden).index_copy(0, tokens, y)
                replaced = hook(layer, dense_in.view(batch, length, -1), dense_out.view(batch, length, hidden), expert=expert, routed=routed.view(batch, length))
                if replaced is not None:
                    y = replaced.reshape(batch * length, hidden)[tokens]
            out.index_add_(0, tokens, y * top[tokens, slot, None])
        return out.view(batch, length, hidden)

    def run_layer(self, layer: int, h: torch.Tensor, weights: dict[str, torch.Tensor] | None = None, hook: MlpHook | None = None) -> torch.Tensor:
        """One decoder layer on hidden states h (B,T,H); loads the layer unless weights are given."""
        w = weights if weights is not None else self.layer_weights(layer)
        length = h.shape[1]
        rope = self.rope(length, layer)
        mask = causal_mask(length, self.config.sliding_window if self.is_sliding(layer) else None, self.device)
        pre_norm = self.family.pre_norm
        attn = self.attention(layer, self.norm(h, w.get("attn_norm")) if pre_norm else h, w, rope, mask)
        if "post_attn_norm" in w:
            attn = self.norm(attn, w["post_attn_norm"])
        h = h + attn
        out = self.mlp(layer, self.norm(h, w.get("mlp_norm")) if pre_norm else h, w, hook)
        if "post_mlp_norm" in w:
            out = self.norm(out, w["post_mlp_norm"])
        h = h + out
        self.check_output(layer, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, the head streamed in row chunks of the vocabulary; soft-capped where the family does."""
        x = self.final_norm(h)
        head = self.family.global_tensors(self.config)["head"]
        return self.softcap(torch.cat([product(x, chunk) for _, chunk in self.head_chunks(self._load_dtype(head))], dim=-1))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        names = self.family.global_tensors(self.config)
        return self.norm(h, self._get(names["final_norm"]) if "final_norm" in names else None)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma-2's final logit soft-capping (cap * tanh(logits / cap)); the logits as they are elsewhere."""
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits
