"""RULER: the 13 synthetic long-context tasks of NVIDIA's RULER benchmark, generated offline.

Faithful to the published definitions (github.com/NVIDIA/RULER, ``scripts/synthetic.yaml`` and
``scripts/data/synthetic/*``, Apache-2.0): task names, templates with their answer prefixes, needle
formats (adjective-noun words, 7-digit numbers, UUIDs), haystacks (the repeated noise sentences,
essay prose, haystacks of distractor needles), variable-tracking chains with one in-context example,
common-word lists with one example, Zipf-distributed coded words, and tokens to generate per task.

Offline substitutes for what RULER downloads:

- essay haystack: original prose shipped in ``data/essays.txt`` (written for subquad, MIT) instead of
  Paul Graham's essays; the text repeats with shuffled paragraphs when a context needs more of it.
- word lists: ``data/adjectives.txt``, ``nouns.txt``, ``verbs.txt`` (common English words, MIT) instead
  of the wonderwords package; made-up pronounceable words extend them for very long word lists.
- qa_1 / qa_2: procedurally generated fact documents (see ``_facts.py``) instead of SQuAD / HotpotQA.

Sizing follows RULER: the haystack grows until prompt tokens + tokens to generate reach the length,
counted with the given tokenizer as the model sees the prompt (special tokens such as BOS included).

Example::

    from subquad.eval import ruler
    samples = ruler.generate("niah_single_2", 4096, tokenizer, num_samples=10, seed=0)
    score = ruler.score("niah_single_2", prediction, samples[0].answers)
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._core import (
    Built,
    PseudoWords,
    Sample,
    check_int,
    check_tokenizer,
    essay_haystack,
    fit_haystack,
    sample_chain,
    sample_rng,
    string_match_all,
    string_match_part,
    word_list,
)

__all__ = ["TASKS", "MAX_NEW_TOKENS", "Sample", "generate", "iter_samples", "score"]

TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)

# RULER's synthetic.yaml: haystack type, key type, value type, #keys, #values per key, #queried keys.
_NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}

# RULER's tokens_to_generate per task family.
MAX_NEW_TOKENS: dict[str, int] = {
    **{task: 128 for task in _NIAH},
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_1": 32,
    "qa_2": 32,
}

_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
_NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's needle depths: 40 evenly spaced percentages, sampled without replacement per sample.
_DEPTHS = [round(100 * i / 39) for i in range(40)]

_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
    "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
    " Answer:"
)
_QA_DOCUMENT = "Document {i}:\n{document}"

Builder = Callable[[int], Built]


def _check_task(task: Any) -> str:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not a RULER task; expected one of {', '.join(TASKS)}")
    return task


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction in [0, 1], case-insensitive, as RULER does.

    qa_1 / qa_2 use string_match_part (1 if any reference answer occurs in the prediction); every other
    task uses string_match_all (the share of reference answers that occur in the prediction).
    """
    _check_task(task)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise TypeError(f"answers must be a list of str, got {answers!r}")
    if task.startswith("qa_"):
        return string_match_part(prediction, answers)
    return string_match_all(prediction, answers)


def generate(task: str, length: int, tokenizer: Any, num_samples: int, seed: int = 0) -> list[Sample]:
    """Generate ``num_samples`` prompts of ``task`` sized to ``length`` tokens of ``tokenizer``.

    Each sample satisfies ``prompt_tokens + max_new_tokens <= length`` with the haystack grown as far
    as it fits. The same (task, length, seed, sample index) gives the same prompt for a given tokenizer;
    sample i does not depend on how many samples are asked for.
    """
    check_int("num_samples", num_samples, 0)
    return list(iter_samples(task, length, tokenizer, seed, stop=num_samples))


def iter_samples(
    task: str,
    length: int,
    tokenizer: Any,
    seed: int = 0,
    *,
    start: int = 0,
    stop: int | None = None,
    hint: int | None = None,
) -> Iterator[Sample]:
    """:func:`generate`'s samples from index ``start`` (before ``stop``), each built when asked for:
    a million-token prompt is megabytes of text and seconds of tokenizing. They equal :func:`generate`'s
    when ``hint`` is sample ``start - 1``'s ``meta["haystack_size"]`` (``_core.sample_chain``)."""
    _check_task(task)
    check_int("length", length, 1)
    check_int("seed", seed, -(2**63))
    check_tokenizer(tokenizer)
    max_new_tokens = MAX_NEW_TOKENS[task]
    budget = length - max_new_tokens
    if budget <= 0:
        raise ValueError(
            f"length {length} leaves no room for a {task} prompt: the task generates {max_new_tokens} tokens"
        )

    def make(index: int, hint: int | None) -> Sample:
        rng = sample_rng("ruler", task, length, seed, index)
        build, minimum = _builder(task, rng, length, tokenizer)
        size, built, tokens = fit_haystack(
            build, tokenizer, budget, minimum=minimum, hint=hint, what=f"{task} at length {length}"
        )
        return Sample(
            task=task,
            length=length,
            index=index,
            input=built.text,
            answers=list(built.answers),
            max_new_tokens=max_new_tokens,
            prompt_tokens=tokens,
            meta={"haystack_size": size, **built.meta},
        )

    return sample_chain(make, start, stop, hint)


def _builder(task: str, rng: random.Random, length: int, tokenizer: Any) -> tuple[Builder, int]:
    if task in _NIAH:
        return _niah_builder(task, rng), 1
    if task == "vt":
        return _vt_builder(rng, length, tokenizer), 1
    if task == "cwe":
        return _cwe_builder(rng, length), 11
    if task == "fwe":
        return _fwe_builder(rng, length), 20
    return _qa_builder(task, rng), 1


# ---------------------------------------------------------------------------------------------------
# Needle in a haystack


def _random_needle_part(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(word_list('adjectives'))}-{rng.choice(word_list('nouns'))}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join_query(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]


def _niah_template(single: bool) -> tuple[str, bool]:
    template = _NIAH_TEMPLATE
    if single:
        # RULER's own rewrite for one answer: "Some ... are" -> "A ... is", plural -> singular.
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
    return template, single


def _niah_builder(task: str, rng: random.Random) -> Builder:
    haystack, key_kind, value_kind, num_keys, num_values, num_queries = _NIAH[task]
    num_keys = max(num_keys, num_queries)
    keys: list[str] = []
    while len(keys) < num_keys:
        key = _random_needle_part(rng, key_kind)
        if key not in keys:
            keys.append(key)
    values = [[_random_needle_part(rng, value_kind) for _ in range(num_values)] for _ in keys]
    needles = [
        _NIAH_NEEDLE.format(type_needle_v=value_kind, key=key, value=value)
        for key, vals in zip(keys, values)
        for value in vals
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), num_queries)
    answers = [value for i in queried for value in values[i]]
    template, single = _niah_template(num_queries * num_values == 1)
    type_needle_v = value_kind[:-1] if single else value_kind
    query = _join_query([keys[i] for i in queried])
    # Where each needle goes, fixed per sample so that the prompt only grows with the haystack size.
    if haystack == "essay":
        depths = sorted(d / 100 for d in rng.sample(_DEPTHS, len(needles)))
    else:
        depths = sorted(rng.random() for _ in needles)
    distractors = _DistractorNeedles(rng.getrandbits(64), key_kind, value_kind, set(keys))

    def build(size: int) -> Built:
        if haystack == "essay":
            context = essay_haystack(size, needles, depths)
        else:
            lines = [_NOISE] * size if haystack == "noise" else distractors.take(size)
            for offset, (depth, needle) in enumerate(zip(depths, needles)):
                lines.insert(int(size * depth) + offset, needle)
            context = "\n".join(lines)
        text = template.format(type_needle_v=type_needle_v, context=context, query=query)
        return Built(text, answers, {"depths": depths, "keys": [keys[i] for i in queried]})

    return build


class _DistractorNeedles:
    """Haystack needles with random keys and values (never a real key), grown on demand."""

    def __init__(self, seed: int, key_kind: str, value_kind: str, exclude: set[str]) -> None:
        self.rng = random.Random(seed)
        self.key_kind, self.value_kind, self.exclude = key_kind, value_kind, exclude
        self.lines: list[str] = []

    def take(self, count: int) -> list[str]:
        while len(self.lines) < count:
            key = _random_needle_part(self.rng, self.key_kind)
            if key in self.exclude:
                continue
            value = _random_needle_part(self.rng, self.value_kind)
            self.lines.append(_NIAH_NEEDLE.format(type_needle_v=self.value_kind, key=key, value=value))
        return self.lines[:count]


# ---------------------------------------------------------------------------------------------------
# Variable tracking


def _vt_chain(
    rng: random.Random, num_hops: int, letters: int, avoid_value: str | None
) -> tuple[list[str], str]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    while value == avoid_value:
        value = str(rng.randint(10000, 99999))
    return names, value


def _vt_prompt(names: list[str], value: str, size: int, fractions: list[float]) -> str:
    # RULER's statements, trailing space included: "VAR B = VAR A ".
    chain = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)
    ]
    lines = [_NOISE] * size
    for j, fraction in enumerate(fractions):
        lines.insert(int(size * fraction) + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return _VT_TEMPLATE.format(context=context, query=value, num_v=len(names))


def _vt_builder(rng: random.Random, length: int, tokenizer: Any, num_hops: int = 4) -> Builder:
    names, value = _vt_chain(rng, num_hops, 5, None)
    fractions = sorted(rng.random() for _ in range(num_hops + 1))
    # One solved example first, as RULER does: 3-letter variables, sized to 500 tokens (a quarter of the
    # length for short contexts, so that the task itself keeps most of the budget).
    example_names, example_value = _vt_chain(rng, num_hops, 3, value)
    example_fractions = sorted(rng.random() for _ in range(num_hops + 1))
    example_budget = min(500, length // 4)
    _, example_built, _ = fit_haystack(
        lambda size: Built(_vt_prompt(example_names, example_value, size, example_fractions), []),
        tokenizer,
        example_budget,
        what=f"the vt in-context example (budget {example_budget} tokens)",
    )
    example = example_built.text.rstrip() + " " + " ".join(example_names) + "\n"

    def build(size: int) -> Built:
        return Built(example + _vt_prompt(names, value, size, fractions), list(names), {"value": value})

    return build


# ---------------------------------------------------------------------------------------------------
# Common words extraction

_PSEUDO_WORDS = PseudoWords("subquad-cwe-words")


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_builder(rng: random.Random, length: int, num_common: int = 10) -> Builder:
    pool = sorted(set(word_list("nouns")) | set(word_list("adjectives")) | set(word_list("verbs")))
    rng.shuffle(pool)
    # RULER's settings below 4K tokens: example of 20 words (3x/1x), task 6x/1x;
    # from 4K on: example of 40 words (10x/3x), task 30x/3x.
    short = length < 4096
    example_words = pool[-20:] if short else pool[-40:]
    common_repeats, uncommon_repeats = (6, 1) if short else (30, 3)
    example_common, example_uncommon = (3, 1) if short else (10, 3)
    main_pool = pool[: len(pool) - len(example_words)]
    example_list = example_words[:num_common] * example_common + example_words[num_common:] * example_uncommon
    rng.shuffle(example_list)
    example = (
        _CWE_TEMPLATE.format(context=_numbered(example_list)) + " " + _numbered(example_words[:num_common])
    )
    shuffle_seed = rng.getrandbits(64)

    def build(size: int) -> Built:
        words = main_pool[:size]
        if size > len(main_pool):
            words = words + _PSEUDO_WORDS.take(size - len(main_pool))
        common = words[:num_common]
        entries = common * common_repeats + words[num_common:] * uncommon_repeats
        random.Random(shuffle_seed + size).shuffle(entries)
        text = example + "\n" + _CWE_TEMPLATE.format(context=_numbered(entries))
        return Built(text, list(common), {"num_words": size})

    return build


# ---------------------------------------------------------------------------------------------------
# Frequent words extraction


def _zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (partial sum plus Euler-Maclaurin tail); scipy is not a dependency."""
    terms = 1000
    partial = math.fsum(k**-alpha for k in range(1, terms))
    return partial + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms**-alpha


def _fwe_builder(rng: random.Random, length: int, alpha: float = 2.0, word_len: int = 6) -> Builder:
    # RULER: vocabulary of (length - tokens to generate) // 50 random 6-letter words, Zipf(alpha) counts,
    # the top-ranked word replaced by '...' as noise; the answer is ranks 2-4.
    vocab_size = (length - MAX_NEW_TOKENS["fwe"]) // 50
    if vocab_size < 5:
        raise ValueError(f"length {length} is too small for fwe: it needs a vocabulary of at least 5 words")
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    zeta = _zeta(alpha)
    shuffle_seed = rng.getrandbits(64)

    def build(size: int) -> Built:
        counts = [int(size * (k + 1) ** -alpha / zeta) for k in range(vocab_size)]
        sampled = [word for word, count in zip(words, counts) for _ in range(count)]
        random.Random(shuffle_seed + size).shuffle(sampled)
        text = _FWE_TEMPLATE.format(context=" ".join(sampled))
        return Built(text, words[1:4], {"num_words": size})

    return build


# ---------------------------------------------------------------------------------------------------
# Question answering over generated documents


def _qa_builder(task: str, rng: random.Random) -> Builder:
    from ._facts import FactWorld

    world = FactWorld(random.Random(rng.getrandbits(64)))
    question, answers, gold = world.single_hop() if task == "qa_1" else world.two_hop()
    depths = [rng.random() for _ in gold]
    distractors: list[str] = []
    shuffle_seed = rng.getrandbits(64)

    def build(size: int) -> Built:
        while len(distractors) < size:
            distractors.extend(world.distractor_group())
        docs = distractors[:size]
        random.Random(shuffle_seed + size).shuffle(docs)
        for depth, doc in sorted(zip(depths, gold)):
            position = int((len(docs) + 1) * depth)
            docs.insert(position, doc)
        positions = [docs.index(doc) + 1 for doc in gold]
        context = "\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=doc) for i, doc in enumerate(docs))
        text = _QA_TEMPLATE.format(context=context, query=question)
        return Built(text, list(answers), {"question": question, "gold_documents": positions})

    return build
