from __future__ import annotations

import re

import pytest

from subquad.eval import mrcr
from subquad.eval._core import count_tokens

from .oracles import solve_mrcr


def test_grade_hand_cases():
    assert mrcr.grade("abc123Hello world", "abc123Hello world", "abc123") == 1.0
    assert mrcr.grade("Hello world", "abc123Hello world", "abc123") == 0.0
    assert mrcr.grade(" abc123Hello world", "abc123Hello world", "abc123") == 0.0
    partial = mrcr.grade("abc123Hello", "abc123Hello world", "abc123")
    assert 0.0 < partial < 1.0 and abs(partial - 2 * 5 / (5 + 11)) < 1e-9
    with pytest.raises(TypeError, match="hash_prefix"):
        mrcr.grade("x", "y", None)


def test_ordinal():
    assert [mrcr.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
    ]  # fmt: skip


@pytest.mark.parametrize("task", mrcr.TASKS)
def test_conversations(task, bpe_tokenizer):
    needles = int(task.removesuffix("needle"))
    samples = mrcr.generate(task, 6144, bpe_tokenizer, num_samples=3, seed=5)
    again = mrcr.generate(task, 6144, bpe_tokenizer, num_samples=3, seed=5)
    other = mrcr.generate(task, 6144, bpe_tokenizer, num_samples=3, seed=6)
    assert [s.input for s in samples] == [s.input for s in again]
    assert samples[0].input != other[0].input
    for sample in samples:
        tokens = count_tokens(bpe_tokenizer, sample.input)
        assert tokens == sample.prompt_tokens
        assert 0.9 * 6144 <= tokens + sample.max_new_tokens <= 6144
        request = f"User: Write a {sample.meta['format']} about {sample.meta['topic']}.\n"
        assert sample.input.count(request) == needles
        # Near misses: the topic in another format and the format on another topic.
        topic_elsewhere = re.findall(
            r"User: Write an? (.+?) about " + re.escape(sample.meta["topic"]) + r"\.", sample.input
        )
        assert any(f != sample.meta["format"] for f in topic_elsewhere)
        format_elsewhere = re.findall(
            r"User: Write an? " + re.escape(sample.meta["format"]) + r" about (.+?)\.", sample.input
        )
        assert any(t != sample.meta["topic"] for t in format_elsewhere)
        assert sample.input.endswith("Do not include any other text in your response.\n\nAssistant:")
        answer = sample.answers[0]
        assert answer.startswith(sample.meta["hash"]) and answer[10:] in sample.input
        assert mrcr.grade(solve_mrcr(sample.input), answer, sample.meta["hash"]) == 1.0
        assert mrcr.grade("I cannot help with that.", answer, sample.meta["hash"]) == 0.0


def test_bad_inputs(whitespace_tokenizer):
    with pytest.raises(ValueError, match="'3needle' is not an MRCR task"):
        mrcr.generate("3needle", 4096, whitespace_tokenizer, 1)
    with pytest.raises(ValueError, match="length too small|too small"):
        mrcr.generate("8needle", 200, whitespace_tokenizer, 1)
