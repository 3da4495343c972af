"""swtool: find, protect and study the super weights of LLM checkpoints, streamed."""

from __future__ import annotations

__version__ = "0.1.0"


def load_state_dict(path, dtype=None):
    """A lazy mapping name -> torch tensor of any checkpoint swtool reads, a swtool-quantized one included.

    Quantized tensors come back dequantized with their super weights restored, in
    `dtype` (default: the source's dtype recorded at quantization). One tensor is
    read per lookup; see swtool.formats.state_dict.
    """
    from swtool.formats.state_dict import load_state_dict as load

    return load(path, dtype)
