"""Training: corpus and tokenizer building, skill data (and the training loop in ``trainer``)."""

from subquad.train.data import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    build_corpus,
    load_meta,
    load_split,
    load_tokenizer,
    measure_tokenizers,
    train_tokenizer,
)
from subquad.train.skills import SKILL_KINDS, make_skill_document, write_skill_mixture

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SKILL_KINDS",
    "SPECIAL_TOKENS",
    "build_corpus",
    "load_meta",
    "load_split",
    "load_tokenizer",
    "make_skill_document",
    "measure_tokenizers",
    "train_tokenizer",
    "write_skill_mixture",
]
