from __future__ import annotations

import pytest

from subquad.eval import ruler
from subquad.eval._core import count_tokens

from .oracles import solve_ruler

EXPECTED_TASKS = (
    "niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 "
    "niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2"
).split()

ANSWER_PREFIXES = {
    "niah": (" mentioned in the provided text is", " mentioned in the provided text are"),
    "vt": "they are: ",
    "cwe": " Answer: The top 10 words that appear most often in the list are:",
    "fwe": " Answer: According to the coded text above, the three most frequently appeared words are:",
    "qa": " Answer:",
}


def _family(task: str) -> str:
    return "niah" if task.startswith("niah") else task.split("_")[0]


def test_task_names_are_rulers():
    assert list(ruler.TASKS) == EXPECTED_TASKS


@pytest.mark.parametrize(
    "tokenizer_name, length",
    [
        ("bpe_tokenizer", 2048),
        ("bpe_tokenizer", 8192),
        ("whitespace_tokenizer", 4096),
        ("char_tokenizer", 16384),
    ],
)
@pytest.mark.parametrize("task", EXPECTED_TASKS)
def test_prompts_fill_budget(task, tokenizer_name, length, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for sample in ruler.generate(task, length, tokenizer, num_samples=2, seed=7):
        assert sample.task == task and sample.length == length
        # Recount from scratch: what the model sees, BOS included.
        tokens = count_tokens(tokenizer, sample.input)
        assert tokens == sample.prompt_tokens
        assert tokens + sample.max_new_tokens <= length
        assert tokens + sample.max_new_tokens >= 0.9 * length
        assert sample.input.endswith(ANSWER_PREFIXES[_family(task)])


@pytest.mark.parametrize("task", EXPECTED_TASKS)
def test_deterministic_and_seeded(task, bpe_tokenizer):
    first = ruler.generate(task, 2048, bpe_tokenizer, num_samples=2, seed=1)
    again = ruler.generate(task, 2048, bpe_tokenizer, num_samples=3, seed=1)
    other = ruler.generate(task, 2048, bpe_tokenizer, num_samples=2, seed=2)
    assert [s.input for s in first] == [s.input for s in again[:2]]
    assert [s.answers for s in first] == [s.answers for s in again[:2]]
    assert first[0].input != other[0].input and first[1].input != other[1].input
    assert first[0].input != first[1].input


@pytest.mark.parametrize("task", EXPECTED_TASKS)
def test_answers_in_prompt_and_oracle_scores_100(task, bpe_tokenizer):
    samples = ruler.generate(task, 4096, bpe_tokenizer, num_samples=3, seed=11)
    for sample in samples:
        # Every task puts its answers in the context (fwe/cwe: the words are listed there).
        for answer in sample.answers[:1] if task.startswith("qa") else sample.answers:
            assert answer in sample.input
        assert ruler.score(task, solve_ruler(task, sample.input), sample.answers) == 1.0
        # A model that always says the same thing scores nothing.
        assert ruler.score(task, "I do not know the answer.", sample.answers) == 0.0


def test_needle_counts():
    class Words:
        def encode(self, text):
            return text.split()

    tokenizer = Words()
    counts = {
        "niah_single_2": (1, 1),
        "niah_multikey_1": (4, 1),
        "niah_multivalue": (4, 4),
        "niah_multiquery": (4, 4),
    }
    for task, (needles, answers) in counts.items():
        sample = ruler.generate(task, 3000, tokenizer, 1, seed=0)[0]
        assert sample.input.count("One of the special magic") == needles
        assert len(sample.answers) == answers
    multikey = ruler.generate("niah_multikey_3", 3000, tokenizer, 1, seed=0)[0]
    assert multikey.input.count("One of the special magic uuids for") > 20
    single = ruler.generate("niah_single_1", 3000, tokenizer, 1, seed=0)[0]
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert "The grass is green. The sky is blue." in single.input
    multi = ruler.generate("niah_multivalue", 3000, tokenizer, 1, seed=0)[0]
    assert multi.input.startswith("Some special magic numbers are hidden within the following text.")
    vt = ruler.generate("vt", 3000, tokenizer, 1, seed=0)[0]
    assert vt.input.count("Memorize and track the chain(s)") == 2  # one solved example, then the task
    assert "5 variables are assigned the value" in vt.input


def test_scoring_hand_cases():
    answers = ["1234567", "7654321"]
    assert ruler.score("niah_multivalue", "1234567 and 7654321", answers) == 1.0
    assert ruler.score("niah_multivalue", "only 1234567", answers) == 0.5
    assert ruler.score("niah_multivalue", "nothing", answers) == 0.0
    assert ruler.score("cwe", "1. APPLE 2. pear", ["apple", "pear", "plum", "fig"]) == 0.5
    assert ruler.score("qa_1", "It was the Varn River.", ["Varn River", "Varn"]) == 1.0
    assert ruler.score("qa_2", "maybe 1874", ["1873"]) == 0.0
    assert ruler.score("qa_2", "VARN", ["Varn River", "Varn"]) == 1.0
    with pytest.raises(ValueError, match="not a RULER task"):
        ruler.score("niah", "x", ["x"])
    with pytest.raises(TypeError, match="answers"):
        ruler.score("vt", "x", "x")


def test_bad_inputs(whitespace_tokenizer):
    with pytest.raises(ValueError, match="'niah_single_9' is not a RULER task"):
        ruler.generate("niah_single_9", 4096, whitespace_tokenizer, 1)
    with pytest.raises(ValueError, match="length must be >= 1"):
        ruler.generate("vt", 0, whitespace_tokenizer, 1)
    with pytest.raises(TypeError, match="length must be an int"):
        ruler.generate("vt", "4k", whitespace_tokenizer, 1)
    with pytest.raises(ValueError, match="length too small for qa_1 at length 100"):
        ruler.generate("qa_1", 100, whitespace_tokenizer, 1)
    with pytest.raises(TypeError, match="encode"):
        ruler.generate("vt", 4096, object(), 1)
    assert ruler.generate("vt", 4096, whitespace_tokenizer, 0) == []


def test_long_context_needs_few_full_encodes(bpe_tokenizer):
    """128K-token prompts: sizing must not re-encode the whole prompt at every binary-search step."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.big = inner, 0

        def encode(self, text):
            ids = self.inner(text, verbose=False)["input_ids"]
            self.big += len(ids) > 64_000
            return ids

    length = 128 * 1024
    for task in ("niah_single_2", "qa_2"):
        tokenizer = Counting(bpe_tokenizer)
        samples = ruler.generate(task, length, tokenizer, num_samples=2, seed=0)
        assert tokenizer.big <= 10, (task, tokenizer.big)
        for sample in samples:
            assert 0.99 * length <= sample.prompt_tokens + sample.max_new_tokens <= length
