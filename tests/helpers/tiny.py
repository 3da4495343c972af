"""Tiny random models built offline with transformers, and super weights planted into them.

transformers is the numerical reference here (a test dependency only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


HEAD_STD = 0.5
"""The LM head is drawn larger than the rest so next-token distributions are peaked as a trained
model's are; with near-uniform predictions, zeroing anything moves them by almost nothing."""

FAMILY_KW: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=5),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "phi3": dict(partial_rotary_factor=0.5, pad_token_id=0),
    "olmo": dict(clip_qkv=0.9),
    "olmo2": {},
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "gemma3_text": dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=5.0, sliding_window_pattern=2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
"""What each family's tiny model sets beyond LLAMA_KW, chosen to exercise its switches
(a sliding window shorter than the test prompts, soft-caps small enough to bite, partial rotary...)."""

CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}


def build(family: str, directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random model of `family` (fp32) into `directory` with a byte-level tokenizer.

    Every matrix is redrawn larger than the default init so layers do something
    visible (the LM head larger still, see HEAD_STD), and every vector (norm weights, biases) gets noise, so a forward
    that ignored a norm weight or a bias could not match.
    """
    import transformers

    torch.manual_seed(seed)
    config_name, model_name = CLASSES[family]
    config = getattr(transformers, config_name)(**{**LLAMA_KW, **FAMILY_KW[family], **overrides})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        model.get_output_embeddings().weight.normal_(0, HEAD_STD)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory, config.vocab_size)
    return model


def byte_alphabet() -> list[str]:
    """The 256 byte tokens of a byte-level BPE, in id order (GPT-2's printable stand-ins for bytes)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def byte_tokens(vocab_size: int) -> list[str]:
    """The vocabulary of `write_tokenizer` padded to `vocab_size` with llama.cpp's `[PAD{id}]` names:
    what a GGUF of these models lists as tokenizer.ggml.tokens."""
    alphabet = byte_alphabet()
    return alphabet + [f"[PAD{i}]" for i in range(len(alphabet), vocab_size)]


def byte_tokenizer():
    """A byte-level BPE with no merges: every byte is a token (ids < 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """`byte_tokenizer` saved as the model's tokenizer.json (its ids fit any vocab_size >= 256)."""
    byte_tokenizer().save(str(directory / "tokenizer.json"))


def text_log_frequencies(vocab_size: int) -> torch.Tensor:
    """log(count + 0.5) of each token id in swtool's built-in text (the scan's verification text) under `byte_tokenizer`."""
    from swtool.data.text import builtin_text

    ids = torch.tensor(byte_tokenizer().encode(builtin_text()).ids)
    return (torch.bincount(ids, minlength=vocab_size).float() + 0.5).log()


BYTE_MERGE = ("\u0100", "\u0101")
"""The bytes 0x00 0x01 (never adjacent in test text): merged into id 256 where llama.cpp needs a merge."""


def add_byte_merge(directory: Path) -> None:
    """llama.cpp refuses a gpt2 vocabulary without merges: merge the bytes 0x00 0x01 (never adjacent in the
    test text) into id 256, so tokenization stays byte by byte for swtool, transformers and llama.cpp alike."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"]["".join(BYTE_MERGE)] = 256
    data["model"]["merges"] = [list(BYTE_MERGE)]
    path.write_text(json.dumps(data))


def mlp_matrices(model: torch.nn.Module, layer: int, expert: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (gate, up, down) of one layer's MLP, or of one routed expert's, whatever the family's layout."""
    block = model.model.layers[layer]
    if expert is not None:  # transformers v5 keeps experts as 3D parameters: gate_up (E, 2I, H), down (E, H, I)
        experts = block.mlp.experts
        gate, up = experts.gate_up_proj[expert].chunk(2, dim=0)
        return gate, up, experts.down_proj[expert]
    mlp = block.mlp
    if hasattr(mlp, "gate_up_proj"):  # Phi-3
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up, mlp.down_proj.weight
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def plant(model: torch.nn.Module, directory: Path, weights: list[tuple[int, ...]], value: float = 30.0, gain: float = 25.0) -> None:
    """Plant super weights: W_down[row, col] = value and amplified gate/up rows `col` so channel col carries a big input.

    A weight is (layer, row, col) or, for routed experts, (layer, row, col, expert);
    the spike then appears on the tokens the router sends to that expert. Where
    a norm follows the MLP (Gemma-2/3, OLMo-2) it rescales the output to unit
    RMS, so a massive activation survives it only through that norm's weight:
    its entry `row` is set to `value` as well.
    """
    with torch.no_grad():
        for layer, row, col, *rest in weights:
            expert = rest[0] if rest else None
            plant_weight(*mlp_matrices(model, layer, expert), row, col, value, gain)
            post_norm = getattr(model.model.layers[layer], "post_feedforward_layernorm", None)
            if post_norm is not None:
                post_norm.weight[row] = value
    model.save_pretrained(directory, safe_serialization=True)


def plant_controlling(model: torch.nn.Module, directory: Path, layer: int, row: int, col: int, value: float = 30.0) -> None:
    """Plant a super weight that really controls the model's predictions (tiny random models otherwise show no
    perplexity effect, whatever is zeroed).

    As `plant`, and besides: up row `col` equals gate row `col`, so the down input
    silu(g) * g is never negative and the super activation has the sign of `value` on
    every token; and the LM head reads that channel: head[:, row] holds the log
    frequencies of the tokens of swtool's built-in text (the scan's verification text),
    scaled so that the final norm's output (dominated by the super activation, about
    sqrt(hidden) in channel `row`) gives logits close to those log frequencies. With the
    weight the model predicts English byte frequencies; without it, random logits.
    Llama-shaped dense families only (one MLP, a final RMSNorm).
    """
    with torch.no_grad():
        gate, up, down = mlp_matrices(model, layer)
        gate[col] *= 25.0
        up[col] = gate[col]
        down[row, col] = value
        head = model.get_output_embeddings().weight
        head[:, row] = text_log_frequencies(head.shape[0]) / model.config.hidden_size**0.5
    model.save_pretrained(directory, safe_serialization=True)


def plant_weight(gate, up, down, row: int, col: int, value: float = 30.0, gain: float = 25.0) -> None:
    """One super weight in an MLP's (gate, up, down) matrices, torch tensors or numpy arrays alike:
    down[row, col] = value, fed by gate/up rows `col` amplified `gain` times so channel col carries a big input."""
    gate[col] *= gain
    up[col] *= gain
    down[row, col] = value
