"""Reading a K-quant GGUF: swtool's C decoders give gguf-py's values, for whole tensors and for the rows asked for."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from swtool.codecs import kquants
from swtool.formats.gguf.reader import permute_qk, qk_heads
from swtool.formats.gguf.writer import plan_gguf, save_gguf
from swtool.formats.open import open_checkpoint


@pytest.fixture(scope="module")
def q2_k(tmp_path_factory):
    """A tiny llama with rows of 256 at Q2_K (Q2_K, Q3_K, Q4_K, Q6_K tensors by the mix's rules)."""
    from tests.helpers.tiny import build

    directory = tmp_path_factory.mktemp("q2k")
    build("llama", directory / "hf", hidden_size=256, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=False)
    checkpoint = open_checkpoint(directory / "hf")
    out = directory / "q2_k.gguf"
    save_gguf(checkpoint, plan_gguf(checkpoint, "Q2_K"), out)
    return out


def test_k_tensors_load_as_gguf_py_dequantizes_them(q2_k, monkeypatch):
    checkpoint = open_checkpoint(q2_k)
    stored = {t.name: t for t in gguf.GGUFReader(q2_k).tensors}
    calls = []
    decode = kquants.decode
    monkeypatch.setattr(kquants, "decode", lambda *a, **k: calls.append(a[1]) or decode(*a, **k))
    seen = set()
    for name in checkpoint.names():
        tensor = stored[checkpoint.stored_name(name)]
        if tensor.tensor_type not in kquants.TYPES:
            continue
        seen.add(tensor.tensor_type)
        expected = torch.from_numpy(dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32))
        heads = qk_heads(checkpoint.family, checkpoint.config, name)  # the file holds Q/K rows permuted
        got = checkpoint.load(name)
        assert torch.equal(permute_qk(got, heads) if heads else got, expected), name
        assert torch.equal(checkpoint.load(name, rows=[5, 1, 100]), got[[5, 1, 100]]), name
        assert torch.equal(checkpoint.load(name, rows=slice(3, 9)), got[3:9]), name
    assert len(seen) >= 3 and set(calls) == seen  # several K types, each read by swtool's decoders


def test_rows_decode_only_their_bytes(q2_k, monkeypatch):
    """The embedding rows of a prompt: only those rows' bytes reach the decoder."""
    checkpoint = open_checkpoint(q2_k)
    sizes = []
    decode = kquants.decode
    monkeypatch.setattr(kquants, "decode", lambda raw, *a, **k: sizes.append(np.asarray(raw).size) or decode(raw, *a, **k))
    name = "model.embed_tokens.weight"
    qtype = gguf.GGMLQuantizationType[checkpoint.stored_dtype(name)]
    assert qtype in kquants.TYPES
    checkpoint.load(name, rows=[7, 3])
    assert sizes == [2 * kquants.row_bytes(256, qtype)]



def test_tensor_bytes_are_read_not_mapped(q2_k, monkeypatch):
    """Rows come from pread of their own bytes (a memory map's touched pages would stay in the process's RSS:
    a scan or a rewrite of a GGUF grew by the whole file)."""
    import swtool.formats.gguf.reader as reader_mod

    checkpoint = open_checkpoint(q2_k)
    read = []
    preadv = reader_mod.os.preadv
    monkeypatch.setattr(reader_mod.os, "preadv", lambda fd, buffers, offset: read.append(sum(len(b) for b in buffers)) or preadv(fd, buffers, offset))
    name = "model.embed_tokens.weight"
    qtype = gguf.GGMLQuantizationType[checkpoint.stored_dtype(name)]
    rows = checkpoint.load(name, rows=[7, 3])
    assert sum(read) == 2 * kquants.row_bytes(256, qtype) and len(read) == 2
    assert torch.equal(rows, checkpoint.load(name)[[7, 3]])
