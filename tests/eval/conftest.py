"""Fixtures for the eval tests: small tokenizers built in memory and a tiny random Llama on disk."""

from __future__ import annotations

import pytest

from subquad.eval._core import essay_paragraphs, word_list


class CharTokenizer:
    """One token per character: the harshest case for haystack granularity."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class WhitespaceTokenizer:
    """One token per whitespace-separated word, plus a BOS like most model tokenizers add."""

    def encode(self, text: str) -> list[int]:
        return [0] + [len(w) for w in text.split()]


def _training_text() -> list[str]:
    words = " ".join(word_list("adjectives") + word_list("nouns") + word_list("verbs"))
    extra = [
        "One of the special magic numbers for quick-fox is: 1234567.",
        "VAR ABCDE = 12345 VAR FGHIJ = VAR ABCDE",
        "Document 1: The Varnok Bridge was designed by Ada Brook and completed in 1873.",
        "User: Write a poem about tapirs. Assistant: Oh tapirs, so calm.",
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ]
    return list(essay_paragraphs()) + [words] * 3 + extra * 20


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE (2000 tokens) trained on the package's own prose, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    # Adds BOS to every encode, as Llama tokenizers do: sizing must count it.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )


@pytest.fixture(scope="session")
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def whitespace_tokenizer():
    return WhitespaceTokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A random 2-layer LlamaForCausalLM and its tokenizer saved together, nothing downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        bos_token_id=bpe_tokenizer.bos_token_id,
        eos_token_id=bpe_tokenizer.eos_token_id,
        pad_token_id=bpe_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path
