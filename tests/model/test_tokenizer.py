"""The ids of a whole text: `text_ids` (eval, imatrix) takes less memory than `encode` and must give the same ids."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from swtool.data.text import builtin_text
from swtool.model.tokenizer import text_ids


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE with merges, trained on the built-in text, that puts <s> first (as Llama's do)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([builtin_text()], trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_text_ids_are_the_ids_of_encode(tokenizer, add_special_tokens):
    text = builtin_text() + " naïve <s> café\n\n  " + builtin_text()[:500]
    expected = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    assert len(expected) < len(text.encode()) - 100  # the merges are used
    assert (expected[0] == tokenizer.token_to_id("<s>")) == add_special_tokens
    assert text_ids(tokenizer, text, add_special_tokens) == expected
