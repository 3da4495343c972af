"""Check a checkpoint's tensors against its config before any work starts.

A config that declares more layers than the weights hold, fewer (so layers
would be silently dropped), or widths the tensors do not have is found here,
at open, with the tensor's name, instead of hours into a quantization.
"""

from __future__ import annotations

import re

from swtool.errors import SwtoolError
from swtool.families import family_of
from swtool.formats.base import Checkpoint

LAYER_INDEX = re.compile(r"^(?:model\.layers|blk)\.(\d+)\.")
"""A decoder layer's tensors, under HF or (for tensors swtool does not map) GGUF names."""


def check_layout(checkpoint: Checkpoint) -> None:
    """Every tensor the config implies exists with the implied shape, and no layer lies beyond the config."""
    config = checkpoint.config
    family = family_of(config)
    globals_ = family.global_tensors(config)
    widths = {"embed": (config.vocab_size, config.hidden_size), "head": (config.vocab_size, config.hidden_size), "final_norm": (config.hidden_size,)}
    for role, name in globals_.items():
        _expect(checkpoint, name, widths.get(role), f"{role}")
    shapes = family.layer_shapes(config)
    for layer in range(config.num_layers):
        for role, name in family.layer_tensors(config, layer).items():
            _expect(checkpoint, name, shapes.get(role), f"layer {layer}; the config declares {config.num_layers} layers")
    for name in checkpoint.names():
        match = LAYER_INDEX.match(name)
        if match and int(match.group(1)) >= config.num_layers:
            raise SwtoolError(
                f"{checkpoint.path}: tensor {checkpoint.stored_name(name)} belongs to layer {match.group(1)}, "
                f"but the config declares {config.num_layers} layers"
            )


def _expect(checkpoint: Checkpoint, name: str, shape: tuple[int, ...] | None, context: str) -> None:
    if not checkpoint.has(name):
        raise SwtoolError(f"{checkpoint.path}: tensor {name} ({context}) is missing")
    if shape is not None:
        checkpoint.check_shape(name, shape)
