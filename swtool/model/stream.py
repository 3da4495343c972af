"""How a forward reads a checkpoint: one layer at a time, the next one loading meanwhile.

This is the loading and streaming policy the forward (`swtool.model.forward.LayerStream`)
is built on: which dtype each matrix loads in, two layers of buffers taking turns, the LM
head in vocabulary chunks. Memory holds two layers plus whatever the caller keeps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from swtool import native
from swtool.errors import SwtoolError
from swtool.families import Family, family_of
from swtool.formats.base import Checkpoint, float_dtype

HEAD_CHUNK_ROWS = 8192
"""Vocabulary rows of the LM head loaded at once: bounds memory for 128k-token vocabularies."""

SMALL_BATCH_ROWS = 48
"""Up to this many input rows, 16-bit weights are multiplied in place by swtool's C kernel, which
costs less CPU than converting them (about 20 ms per 5632x2048 bf16 matrix on one core) plus
torch's fp32 product. Measured on one AVX-512 core, median of 7: at 11 rows 6-8 ms against
15 + 20 ms; at 48 rows 18-19 ms (AVX-512 build) or 21-25 ms (AVX2 build) against 16-18 + 20 ms;
at 64 rows the 2048x5632 shape takes 31 ms against 15 + 20 ms. See `LayerStream.expect_rows`."""

HALF_TYPES = ("BF16", "F16")
"""Stored types whose matrices may stay in 16 bits for the C product kernel."""


class WeightStream:
    """A checkpoint's layers loaded in order on a device, in one dtype (or their 16-bit storage type, see `expect_rows`)."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.family: Family = family_of(self.config)
        self.dtype = dtype
        self.device = torch.device(device)
        self.keep_16bit = False
        """Whether matrices stored in 16 bits load as they are (for `product`); see `expect_rows` and `keep_16bit_matrices`."""
        self.checks_outputs = True
        """Whether dense layers load unchecked for NaN/Inf, their outputs checked instead (`check_output`)."""
        self._unchecked: set[int] = set()
        """Layers loaded unchecked whose output has not been checked yet."""
        self._check_globals()

    def _check_globals(self) -> None:
        names = self.family.global_tensors(self.config)
        for role, name in names.items():
            if not self.checkpoint.has(name):
                raise SwtoolError(f"{self.checkpoint.path}: tensor {name} ({role}) is missing")
        self.checkpoint.check_shape(names["embed"], (self.config.vocab_size, self.config.hidden_size))
        self.checkpoint.check_shape(names["head"], (self.config.vocab_size, self.config.hidden_size))

    def expect_rows(self, rows: int) -> None:
        """Say how many input rows (batch x tokens) the coming layers will run; loads started from now on follow it.

        A few rows (a prompt and its variants) make the products bound by memory traffic, so
        matrices stored in bf16/fp16 then stay in 16 bits and `product` reads them in place:
        half the memory for a layer and no conversion by the loaders. Many rows make them
        bound by arithmetic, where torch's float32 products are faster. Only on the CPU in
        float32 with the vectorised C kernel; otherwise everything loads in the compute dtype.
        """
        on_cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.keep_16bit = on_cpu_fp32 and native.product_kernels() is not None and rows <= SMALL_BATCH_ROWS

    def keep_16bit_matrices(self) -> None:
        """Load matrices stored in bf16/fp16 as they are whatever the rows, for a walk that runs each
        layer on many batches (`swtool.model.windows.stream_windows`); loads started from now on follow it.

        The two layers in flight then take half the memory (for TinyLlama's shape, 176 MB instead
        of 352). A product with many rows widens its matrix into the stream's one reused float32
        buffer (`forward.WideBuffer`), so the values multiplied, hence the results, are those of a
        float32 load; a few rows go to the C kernel as after `expect_rows`. The widening is the
        conversion the loaders did once per layer, done once per batch instead: one pass over the
        matrix against 2 x rows flops per weight for the product. On the random 1.1B benchmark
        checkpoint, 8 windows of 512 tokens in batches of 2 took 98.0 s of CPU against 97.5 s with
        the loaders converting (noise), and 717 MB at the peak against 909. For a float32 compute
        dtype only: a 16-bit one loads so anyway.
        """
        self.keep_16bit = self.dtype == torch.float32

    def _load_dtype(self, name: str) -> torch.dtype:
        if self.keep_16bit and len(self.checkpoint.shape(name)) == 2:
            stored = self.checkpoint.stored_dtype(name)
            return float_dtype(stored, self.dtype) if stored in HALF_TYPES else self.dtype
        return self.dtype

    def _get(self, name: str, out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
        return self.checkpoint.load(name, self._load_dtype(name), out=out, checked=checked).to(self.device)

    def _decide_check(self, layer: int, names: dict[str, str]) -> bool:
        """Whether a layer's weights are checked for NaN/Inf as they load; if not, the layer is noted for `check_output`.

        Every weight of a dense layer multiplies an input of every token, so one NaN or infinity
        in it makes the layer's output non-finite: checking the small output replaces a pass
        over every weight (on the random 7B, 3.4 s of the loader threads' CPU in a 9.8 s scan).
        Routed experts see only some tokens, so an MoE layer's weights are checked as they load."""
        if self.checks_outputs and "router" not in names:
            self._unchecked.add(layer)
            return False
        return True

    def check_output(self, layer: int, output: torch.Tensor) -> None:
        """After a layer loaded unchecked: a non-finite output means NaN/Inf in its weights, which
        are then checked to name the first bad value. An output that overflowed without one (an
        fp16 compute dtype can) makes the layers loaded after it checked as they load, as before."""
        if layer not in self._unchecked:
            return
        self._unchecked.discard(layer)
        if bool(torch.isfinite(output).all()):
            return
        for name in self._layer_names(layer).values():
            self.checkpoint.load(name, self._load_dtype(name))
        self.checks_outputs = False

    def _layer_names(self, layer: int) -> dict[str, str]:
        """Role -> tensor name of one layer, each checked to exist with the shape the config implies."""
        names = self.family.layer_tensors(self.config, layer)
        shapes = self.family.layer_shapes(self.config)
        for role, name in names.items():
            if not self.checkpoint.has(name):
                raise SwtoolError(f"{self.checkpoint.path}: tensor {name} (layer {layer}) is missing")
            self.checkpoint.check_shape(name, shapes[role])
        return names

    def _refillable(self, name: str, old: torch.Tensor | None) -> torch.Tensor | None:
        """`old` where loading `name` refills it; otherwise None, so that it is not kept alive for nothing."""
        return old if old is not None and self.checkpoint.refills(name, self._load_dtype(name)) else None

    def layer_weights(self, layer: int, reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One layer's tensors by role. `reuse`: another layer's weights, whose buffers are
        refilled where the format allows (twice as fast as fresh memory) and taken out of
        `reuse` one by one, so each old tensor is freed as soon as its role is loaded."""
        spare = reuse if reuse is not None else {}
        names = self._layer_names(layer)
        checked = self._decide_check(layer, names)
        return {role: self._get(name, self._refillable(name, spare.pop(role, None)), checked) for role, name in names.items()}

    def walk(self, start: int = 0, loaders: int = 2) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Each layer from `start` with its weights, the next layer loading meanwhile on `loaders` threads.

        Reading and converting a layer (bf16 -> fp32 runs at about 1 GB/s on one core)
        overlaps the caller's work on the previous one, and the tensors of a layer load
        in parallel. Two layers' buffers take turns: the weights yielded for a layer are
        valid until the caller asks for the next one. Memory is two layers plus activations.
        Unmapping a layer (a 7B layer maps 400 MB: 100,000 page-table entries to tear down, about
        10 ms) is a loader's job too.
        """
        layers = self.layers(start)
        with ThreadPoolExecutor(loaders, thread_name_prefix="swtool-load") as pool:

            def submit(layer: int, previous: dict[str, torch.Tensor]) -> dict[str, Future]:
                names = self._layer_names(layer)
                checked = self._decide_check(layer, names)
                refill = {role: previous.pop(role) for role, name in names.items() if self._refillable(name, previous.get(role)) is not None}
                pool.submit(previous.clear)  # the rest, maps of the stored bytes, are unmapped by a loader, not by the caller's thread
                return {role: pool.submit(self._get, name, refill.get(role), checked) for role, name in names.items()}

            pending = submit(layers[0], {}) if layers else {}
            previous: dict[str, torch.Tensor] = {}
            for index, layer in enumerate(layers):
                weights = {role: future.result() for role, future in pending.items()}
                if index + 1 < len(layers):
                    pending = submit(layers[index + 1], previous)
                yield layer, weights
                previous = weights

    def head_chunks(self, dtype: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
        """The LM head's rows in chunks of the vocabulary (HEAD_CHUNK_ROWS), each loaded as its turn comes:
        a large vocabulary's head is never whole in memory."""
        name = self.family.global_tensors(self.config)["head"]
        for start in range(0, self.config.vocab_size, HEAD_CHUNK_ROWS):
            rows = slice(start, min(start + HEAD_CHUNK_ROWS, self.config.vocab_size))
            yield rows, self.checkpoint.load(name, dtype, rows=rows).to(self.device)

    def layers(self, start: int = 0) -> Sequence[int]:
        return range(start, self.config.num_layers)
