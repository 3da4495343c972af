"""`swtool dequantize` as a library call: a quantized checkpoint (swtool-rtn or GGUF) back as an HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output, check_target
from swtool.formats.base import Checkpoint
from swtool.formats.hf.export import copy_model_files, export_hf, write_weights
from swtool.formats.hf.writer import parse_size
from swtool.formats.open import open_checkpoint
from swtool.formats.rtn import layout
from swtool.formats.compressed_tensors import schema as ct_schema
from swtool.provenance import Provenance, model_inputs
from swtool.readahead import ReadAhead
from swtool.workers import parallel_chunks


QUANTIZED_FORMATS = (layout.FORMAT, ct_schema.METHOD)
"""Directory formats whose tensors are dequantized on reading (GGUF files are handled apart)."""


def require_quantized(checkpoint: Checkpoint) -> Checkpoint:
    if checkpoint.format not in QUANTIZED_FORMATS:
        raise SwtoolError(
            f"{checkpoint.path}: neither a GGUF file nor a swtool-quantized checkpoint (no swtool.format in its "
            "safetensors metadata) or a compressed-tensors one (no quantization_config in config.json)"
        )
    return checkpoint


def dequantize_to(
    checkpoint: Checkpoint, directory: Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9, provenance: dict[str, str] | None = None
) -> torch.dtype:
    """Write a quantized checkpoint (swtool-rtn, compressed-tensors) or a GGUF file as a standard HF directory; returns the dtype written.

    A GGUF is dequantized tensor by tensor (Q/K un-permuted by the reader), fp16 unless asked otherwise.
    """
    if checkpoint.format == "gguf":
        dtype = dtype or torch.float16
        export_hf(checkpoint, directory, dtype, max_shard_bytes, {"swtool.dequantized_from": "gguf", **(provenance or {})})
        return dtype
    checkpoint = require_quantized(checkpoint)
    dtype = dtype or checkpoint.model_dtype()
    with parallel_chunks():
        write_weights(checkpoint, directory, dtype, max_shard_bytes, {"swtool.dequantized_from": checkpoint.format, **(provenance or {})})
    copy_model_files(checkpoint, directory, dtype)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dtype


def dequantize_model(
    quantized: Path, output: Path, dtype: torch.dtype | None, dtype_option: str | None, max_shard_size: str, force: bool, ahead: ReadAhead | None = None
) -> None:
    """Check the options and the input, then write the HF directory atomically."""
    max_bytes = parse_size(max_shard_size)
    check_target(output, [quantized], force)
    checkpoint = open_checkpoint(quantized)
    if ahead is not None:
        ahead.stop()
    if checkpoint.format != "gguf":
        require_quantized(checkpoint)
    options = {"dtype": dtype_option, "max_shard_size": max_shard_size}
    with Provenance("dequantize", options, model_inputs(checkpoint)) as record, atomic_output(output, directory=True, inputs=[quantized], force=force) as temp:
        dequantize_to(checkpoint, temp, dtype, max_bytes, record.fields)
        record.seal(temp)
