"""Long prompts tokenized in pieces on all cores (``_core.encode``) get the whole text's ids."""

from __future__ import annotations

import copy
import random

import pytest

from subquad.demo import default_model_path
from subquad.eval import _core

SHIPPED = default_model_path()


def _mixed_text(seed: int, words: int = 3000) -> str:
    """Words, numbers, contractions, non-ASCII letters and runs of spaces, tabs and newlines."""
    rng = random.Random(seed)
    parts = [
        "the",
        "The",
        "grass",
        "green.",
        "1234567",
        "3.5%",
        "don't",
        "we'll",
        "D\u00e9j\u00e0",
        "\u4e2d\u6587",
        "(x)",
        "--",
        "a-b",
        "x1y2",
        "<s>",
        "'s",
    ]
    gaps = [" ", " ", " ", "", "  ", "\n", " \n ", "\t", "\n\n"]
    return "".join(rng.choice(parts) + rng.choice(gaps) for _ in range(words))


def _whole(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


@pytest.mark.parametrize("piece_chars", [1, 7, 64, 1000])
def test_pieces_give_the_whole_texts_ids(bpe_tokenizer, piece_chars):
    backend = _core._piece_backend(bpe_tokenizer)
    assert backend is not None
    text = _mixed_text(piece_chars)
    want = _whole(bpe_tokenizer, text)
    assert want[0] == bpe_tokenizer.bos_token_id and want.count(want[0]) == 1 + text.count("<s>")
    assert _core._encode_in_pieces(backend, text, piece_chars) == want


def test_long_texts_are_tokenized_in_pieces(bpe_tokenizer, monkeypatch):
    monkeypatch.setattr(_core, "PIECE_CHARS", 100)
    pieces = []
    real = _core._encode_in_pieces
    monkeypatch.setattr(_core, "_encode_in_pieces", lambda *args: pieces.append(args[2]) or real(*args))
    text = _mixed_text(3)
    assert _core.encode(bpe_tokenizer, text) == _whole(bpe_tokenizer, text)
    assert pieces == [100]
    assert _core.encode(bpe_tokenizer, text[:200]) == _whole(bpe_tokenizer, text[:200])  # too short
    assert pieces == [100]


@pytest.mark.skipif(not (SHIPPED / "tokenizer.json").is_file(), reason="subquad-nano is not shipped")
def test_the_shipped_tokenizer_is_tokenized_in_pieces():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    backend = _core._piece_backend(tokenizer)
    assert backend is not None
    text = _mixed_text(4)
    assert _core._encode_in_pieces(backend, text, 50) == _whole(tokenizer, text)


def _with_prefix_space(backend):
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)


def _with_normalizer(backend):
    from tokenizers import normalizers

    backend.normalizer = normalizers.Strip()  # would strip every piece's ends


def _with_whitespace_split(backend):
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Whitespace()


@pytest.mark.parametrize("change", [_with_prefix_space, _with_normalizer, _with_whitespace_split])
def test_pieces_are_not_used_where_they_could_change_the_ids(bpe_tokenizer, monkeypatch, change):
    monkeypatch.setattr(_core, "PIECE_CHARS", 100)
    tokenizer = copy.deepcopy(bpe_tokenizer)
    change(tokenizer.backend_tokenizer)
    assert _core._piece_backend(tokenizer) is None
    text = _mixed_text(5, 300)
    assert _core.encode(tokenizer, text) == _whole(tokenizer, text)
