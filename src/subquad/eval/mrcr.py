"""MRCR-style multi-round coreference, generated offline.

Modelled on OpenAI's MRCR (``openai/mrcr``): a long multi-turn conversation in which the user asks for
many pieces of writing ("Write a poem about tapirs.") and the assistant answers each. Among them, 2, 4
or 8 requests are identical (same format, same topic) and get distinct responses; near-miss
distractors ask for the same topic in another format or the same format on another topic. The last
user turn asks: "Prepend <hash> to the 3rd (1 indexed) poem about tapirs. Do not include any other
text in your response." The model must find that exact response among the look-alikes and reproduce
it. ``grade`` is MRCR's: 0 unless the response starts with the hash, else the difflib
SequenceMatcher ratio between the rest and the expected response.

The conversation is rendered as a plain transcript (``User: ...`` / ``Assistant: ...`` turns separated
by blank lines, ending with ``Assistant:``), which base and chat models can both continue. Responses
are generated from the shipped word lists, so nothing is downloaded.

Example::

    from subquad.eval import mrcr
    samples = mrcr.generate("4needle", 32768, tokenizer, num_samples=5, seed=0)
    mrcr.grade(model_output, samples[0].answers[0], samples[0].meta["hash"])
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from difflib import SequenceMatcher
from typing import Any

from ._core import (
    Built,
    Sample,
    check_int,
    check_tokenizer,
    content_tokens,
    fit_haystack,
    sample_chain,
    sample_rng,
    word_list,
)

__all__ = ["TASKS", "FORMATS", "TOPICS", "generate", "grade", "iter_samples", "ordinal"]

TASKS: tuple[str, ...] = ("2needle", "4needle", "8needle")

TOPICS: tuple[str, ...] = (
    "tapirs", "lighthouses", "sourdough bread", "the tides", "old maps", "thunderstorms", "bicycles",
    "honeybees", "glaciers", "chess", "lanterns", "autumn leaves", "city buses", "owls", "paper boats",
    "volcanoes", "clocks", "whales", "winter gardens", "train stations", "kites", "snails", "libraries",
    "comets", "pancakes", "foxes", "teapots", "mountains", "umbrellas", "lost keys",
)  # fmt: skip


def _pick(rng: random.Random, kind: str) -> str:
    return rng.choice(word_list(kind))


def _poem(rng: random.Random, topic: str) -> str:
    patterns = (
        "Oh {t}, so {a} and {a2},",
        "you {v} the {n} at the edge of the {n2}.",
        "We watch the {a} {n} and learn to {v},",
        "and every {n} remembers how to {v}.",
        "Beneath a {a} sky the {t} wait,",
        "like a {n} that forgot its {n2}.",
        "I {v} for {t} when the {n} is {a},",
        "and the {a} {n2} will {v} again.",
    )
    lines = rng.sample(patterns, rng.randint(4, 7))
    return "\n".join(_fill(rng, line, topic) for line in lines)


def _story(rng: random.Random, topic: str) -> str:
    sentences = [
        "Once, in a {a} town beside a {n}, there lived a {n2} who cared about nothing but {t}.",
        "Every morning it would {v} the {a} {n} and dream of {t}.",
        "One day a {a2} stranger arrived carrying a {n} and a story about {t}.",
        "They tried to {v} together, but the {n2} was too {a}.",
        "In the end they learned that {t} cannot be hurried, only {a} and patient.",
        "The {n} is still there, and people say it will {v} again when the {n2} returns.",
    ]
    chosen = sentences[:1] + rng.sample(sentences[1:], rng.randint(2, 4))
    return " ".join(_fill(rng, s, topic) for s in chosen)


def _riddle(rng: random.Random, topic: str) -> str:
    lines = [
        "I am {a} but never {a2}.",
        "I {v} without a {n}, and I {v2} without a {n2}.",
        "You will find me near the {n} when the days are {a}.",
        "Some call me {a2}; the {n2} calls me friend.",
    ]
    chosen = rng.sample(lines, rng.randint(2, 4))
    return "\n".join(_fill(rng, s, topic) for s in chosen) + f"\nWhat am I? (Answer: {topic})"


def _letter(rng: random.Random, topic: str) -> str:
    names = ("Alma", "Bruno", "Clara", "Dmitri", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas")
    to, sign = rng.sample(names, 2)
    body = [
        "I have been thinking about {t} ever since we spoke by the {n}.",
        "The {a} weather here makes everyone want to {v}.",
        "Do you remember the {a2} {n2} we found that summer?",
        "I hope you still {v} the {n} every evening.",
        "Write back soon and tell me what you think of {t}.",
    ]
    chosen = rng.sample(body, rng.randint(2, 4))
    return f"Dear {to},\n\n" + " ".join(_fill(rng, s, topic) for s in chosen) + f"\n\nYours, {sign}"


def _blog(rng: random.Random, topic: str) -> str:
    title = _fill(rng, "{A} thoughts on {t}", topic)
    paragraphs = [
        "Most people never stop to {v} when they see {t}, and that is a {a} mistake.",
        "I first noticed it near a {n}, on a {a2} afternoon.",
        "Here is what I learned: {t} reward anyone willing to {v} slowly.",
        "If you only remember one thing, remember the {n2}.",
        "Next week I will write about the {a} {n} instead.",
    ]
    chosen = rng.sample(paragraphs, rng.randint(2, 4))
    return f"# {title}\n\n" + "\n\n".join(_fill(rng, s, topic) for s in chosen)


def _tips(rng: random.Random, topic: str) -> str:
    tips = [
        "Always {v} before you start.",
        "Keep a {a} {n} nearby.",
        "Never {v} {t} in a hurry.",
        "Ask a {a2} friend to {v} with you.",
        "Write down what the {n2} taught you.",
        "Take breaks when the {n} gets {a}.",
    ]
    chosen = rng.sample(tips, rng.randint(3, 5))
    return "\n".join(f"{i + 1}. " + _fill(rng, s, topic) for i, s in enumerate(chosen))


def _dialogue(rng: random.Random, topic: str) -> str:
    turns = [
        "A: Have you ever seen {t} up close?",
        "B: Only once, near the {a} {n}.",
        "A: What did they do?",
        "B: They seemed to {v}, the way a {n2} does.",
        "A: That sounds {a2}.",
        "B: It was. I still {v} about it.",
    ]
    count = rng.choice((4, 6))
    return "\n".join(_fill(rng, s, topic) for s in turns[:count])


FORMATS: dict[str, Callable[[random.Random, str], str]] = {
    "poem": _poem,
    "short story": _story,
    "riddle": _riddle,
    "letter": _letter,
    "blog post": _blog,
    "list of tips": _tips,
    "dialogue": _dialogue,
}


def _fill(rng: random.Random, pattern: str, topic: str) -> str:
    adjective = _pick(rng, "adjectives")
    return pattern.format(
        t=topic,
        a=adjective,
        A=adjective.capitalize(),
        a2=_pick(rng, "adjectives"),
        n=_pick(rng, "nouns"),
        n2=_pick(rng, "nouns"),
        v=_pick(rng, "verbs"),
        v2=_pick(rng, "verbs"),
    )


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _request(fmt: str, topic: str) -> str:
    return f"Write a {fmt} about {topic}."


def _render(turns: list[tuple[str, str]], final: str) -> str:
    parts = [f"User: {user}\n\nAssistant: {assistant}" for user, assistant in turns]
    parts.append(f"User: {final}\n\nAssistant:")
    return "\n\n".join(parts)


def _check_task(task: Any) -> int:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not an MRCR task; expected one of {', '.join(TASKS)}")
    return int(task.removesuffix("needle"))


def generate(task: str, length: int, tokenizer: Any, num_samples: int, seed: int = 0) -> list[Sample]:
    """Generate ``num_samples`` conversations with ``task``'s needle count, sized to ``length`` tokens.

    ``prompt_tokens + max_new_tokens <= length``, where ``max_new_tokens`` is the expected answer's
    token count plus a small margin. ``answers[0]`` is the expected response (hash included) and
    ``meta["hash"]`` the hash to prepend.
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
    """:func:`generate`'s samples from index ``start`` (before ``stop``), each built when asked for; equal
    to :func:`generate`'s when ``hint`` is sample ``start - 1``'s ``meta["haystack_size"]``
    (``_core.sample_chain``)."""
    needles = _check_task(task)
    check_int("length", length, 1)
    check_tokenizer(tokenizer)
    formats = sorted(FORMATS)

    def make(index: int, hint: int | None) -> Sample:
        rng = sample_rng("mrcr", task, length, seed, index)
        fmt, topic = rng.choice(formats), rng.choice(TOPICS)
        responses: list[str] = []
        while len(responses) < needles:
            response = FORMATS[fmt](rng, topic)
            if response not in responses:
                responses.append(response)
        target = rng.randint(1, needles)
        hash_prefix = "".join(rng.choices(string.ascii_letters + string.digits, k=10))
        answer = hash_prefix + responses[target - 1]
        final = (
            f"Prepend {hash_prefix} to the {ordinal(target)} (1 indexed) {fmt} about {topic}. "
            "Do not include any other text in your response."
        )
        # Near misses: same topic in other formats, same format on other topics.
        other_formats = rng.sample([f for f in formats if f != fmt], 2)
        other_topics = rng.sample([t for t in TOPICS if t != topic], 2)
        specials = [(_request(fmt, topic), r) for r in responses]
        specials += [(_request(f, topic), FORMATS[f](rng, topic)) for f in other_formats]
        specials += [(_request(fmt, t), FORMATS[fmt](rng, t)) for t in other_topics]
        order = list(range(len(specials)))
        rng.shuffle(order)
        # Needles keep their order: the k-th needle in the text is responses[k - 1].
        needle_slots = sorted(order[:needles])
        arranged: list[tuple[str, str] | None] = [None] * len(specials)
        for slot, turn in zip(needle_slots, specials[:needles]):
            arranged[slot] = turn
        rest = iter(specials[needles:])
        arranged = [turn if turn is not None else next(rest) for turn in arranged]
        fractions = sorted(rng.random() for _ in arranged)
        filler = _FillerTurns(rng.getrandbits(64), fmt, topic)

        def build(size: int) -> Built:
            turns = list(filler.take(size))
            for offset, (fraction, turn) in enumerate(zip(fractions, arranged)):
                turns.insert(int(size * fraction) + offset, turn)
            return Built(_render(turns, final), [answer])

        max_new_tokens = content_tokens(tokenizer, answer) + 16
        budget = length - max_new_tokens
        if budget <= 0:
            raise ValueError(
                f"length {length} is too small for {task}: the answer alone needs {max_new_tokens}"
            )
        size, built, tokens = fit_haystack(
            build, tokenizer, budget, minimum=0, hint=hint, what=f"mrcr {task} at length {length}"
        )
        meta = {
            "hash": hash_prefix,
            "needles": needles,
            "target": target,
            "format": fmt,
            "topic": topic,
            "haystack_size": size,
        }
        return Sample(task, length, index, built.text, [answer], max_new_tokens, tokens, meta)

    return sample_chain(make, start, stop, hint)


class _FillerTurns:
    """Request/response turns on any (format, topic) except the needle's, grown on demand."""

    def __init__(self, seed: int, fmt: str, topic: str) -> None:
        self.rng = random.Random(seed)
        self.excluded = (fmt, topic)
        self.turns: list[tuple[str, str]] = []

    def take(self, count: int) -> list[tuple[str, str]]:
        while len(self.turns) < count:
            fmt, topic = self.rng.choice(sorted(FORMATS)), self.rng.choice(TOPICS)
            if (fmt, topic) != self.excluded:
                self.turns.append((_request(fmt, topic), FORMATS[fmt](self.rng, topic)))
        return self.turns[:count]


def grade(response: str, answer: str, hash_prefix: str) -> float:
    """MRCR's grader: 0 unless ``response`` starts with ``hash_prefix``, else the SequenceMatcher ratio
    of the rest of the response to the rest of ``answer`` (in [0, 1])."""
    for name, value in (("response", response), ("answer", answer), ("hash_prefix", hash_prefix)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not response.startswith(hash_prefix):
        return 0.0
    response = response.removeprefix(hash_prefix)
    answer = answer.removeprefix(hash_prefix)
    return float(SequenceMatcher(None, response, answer).ratio())
