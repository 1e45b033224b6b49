"""Shared pieces of the eval suites: samples, token counting, haystack sizing, shipped text.

Everything here is private to ``subquad.eval``; the public entries are ``ruler``, ``mrcr``, ``niah``
and ``runner``.
"""

from __future__ import annotations

import bisect
import random
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One prompt of an eval suite.

    ``input`` is the full prompt (answer prefix included) and ``length`` the token budget it was sized
    for: ``prompt_tokens + max_new_tokens <= length``.
    """

    task: str
    length: int
    index: int
    input: str
    answers: list[str]
    max_new_tokens: int
    prompt_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """What a task builder returns for a given haystack size."""

    text: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def check_tokenizer(tokenizer: Any) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            f"tokenizer must have an encode(text) -> list[int] method, got {type(tokenizer).__name__}"
        )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids the model sees for ``text``: special tokens (BOS) included, as ``tokenizer(text)`` does.

    Texts of more than ``2 * PIECE_CHARS`` characters are tokenized in pieces on all cores where that
    gives the same ids (:func:`_piece_backend`): a 12M-token prompt is a ~35 MB string, ~40 s to
    tokenize on one core, and a prompt is tokenized several times while its haystack is sized."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedTokenizerBase = ()  # noqa: N806
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        if len(text) > 2 * PIECE_CHARS and (backend := _piece_backend(tokenizer)) is not None:
            return _encode_in_pieces(backend, text, PIECE_CHARS)
        # verbose=False: prompts longer than model_max_length are the point here, not a mistake.
        return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    return list(tokenizer.encode(text))


# Characters per piece of a long text tokenized in parallel (~64K tokens of English).
PIECE_CHARS = 1 << 18
# A space between two non-spaces: byte-level BPE's pre-tokenizer regex (GPT-2's) ends a match before it
# and starts one at it, so the pieces' tokens are the text's.
_PIECE_CUT = re.compile(r"(?<=\S) (?=\S)")
# A text with such spaces, digits, punctuation and non-ASCII letters, tokenized both ways once per
# tokenizer: the wrapper may add what its backend does not (a BOS it prepends itself, say).
_PIECE_CHECK = "Ab 12 c. D\u00e9f,  g'h (3.5%) i\n\n j \u4e2d\u6587 k\tl - m " * 24
_piece_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _piece_backend(tokenizer: Any) -> Any | None:
    """``tokenizer``'s ``tokenizers`` backend where tokenizing a text in pieces cut at ``_PIECE_CUT``
    gives its ids: no normalizer, a byte-level pre-tokenizer with its regex and no added prefix space,
    no truncation or padding set, no added token containing a space; checked once on ``_PIECE_CHECK``
    against the wrapper. None otherwise (the caller tokenizes the whole text)."""
    try:
        verdict = _piece_verdicts.get(tokenizer)
    except TypeError:  # not weak-referenceable: check each time
        verdict = None
    if verdict is not None:
        return tokenizer.backend_tokenizer if verdict else None
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    ok = (
        isinstance(pre, pre_tokenizers.ByteLevel)
        and pre.use_regex
        and not pre.add_prefix_space
        and backend.normalizer is None
        and backend.truncation is None
        and backend.padding is None
        and not any(" " in t.content for t in backend.get_added_tokens_decoder().values())
    )
    if ok:
        want = list(tokenizer(_PIECE_CHECK, add_special_tokens=True, verbose=False)["input_ids"])
        ok = _encode_in_pieces(backend, _PIECE_CHECK, 16) == want
    try:
        _piece_verdicts[tokenizer] = ok
    except TypeError:
        pass
    return backend if ok else None


def _encode_in_pieces(backend: Any, text: str, piece_chars: int) -> list[int]:
    """``backend``'s ids of ``text`` (special tokens added once), tokenizing pieces of about
    ``piece_chars`` characters cut at ``_PIECE_CUT`` with its parallel batch encoder."""
    from tokenizers import Encoding

    cuts = [0]
    while len(text) - cuts[-1] > piece_chars and (cut := _PIECE_CUT.search(text, cuts[-1] + piece_chars)):
        cuts.append(cut.start())
    cuts.append(len(text))
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    merged = Encoding.merge(backend.encode_batch(pieces, add_special_tokens=False), growing_offsets=True)
    return list(backend.post_process(merged, add_special_tokens=True).ids)


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


def content_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` as a continuation: without the special tokens ``encode`` adds around it."""
    return max(0, count_tokens(tokenizer, text) - count_tokens(tokenizer, ""))


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def sample_rng(*parts: object) -> random.Random:
    # String seeds go through sha512 in random.Random, so they are stable across runs and platforms.
    return random.Random("/".join(str(p) for p in parts))


def sample_chain(
    make: Callable[[int, int | None], Sample], start: int, stop: int | None, hint: int | None
) -> Iterator[Sample]:
    """Samples ``start, start + 1, ...`` (before ``stop``; without end when None), each built when asked for.

    ``make(index, hint)`` builds one sample, its haystack search starting from ``hint``; the search can
    settle a unit or two away depending on where it starts, so each sample's ``meta["haystack_size"]``
    is the next one's hint, as in a run from sample 0. Sample ``i`` therefore equals that run's when
    ``hint`` is sample ``i - 1``'s size (None for ``start == 0``). Arguments are checked at the call.
    """
    check_int("start", start, 0)
    if stop is not None:
        check_int("stop", stop, start)
    if hint is not None:
        check_int("hint", hint, 0)

    def chain(hint: int | None) -> Iterator[Sample]:
        index = start
        while stop is None or index < stop:
            sample = make(index, hint)
            hint = sample.meta["haystack_size"]
            yield sample
            index += 1

    return chain(hint)


def fit_haystack(
    build: Callable[[int], Built],
    tokenizer: Any,
    budget: int,
    *,
    minimum: int = 1,
    hint: int | None = None,
    what: str = "task",
) -> tuple[int, Built, int]:
    """Largest haystack size ``n >= minimum`` whose prompt ``build(n).text`` has at most ``budget`` tokens.

    RULER binary-searches the haystack size and re-encodes the full prompt at every step; at a million
    tokens that is twenty encodes of a 4 MB string per sample. Token counts grow almost linearly in
    ``n``, so this does an interpolation (secant) search inside a shrinking bracket instead: the first
    guess comes from a small probe (or ``hint``, typically the previous sample's size), and a few exact
    counts of the full prompt settle it. Every returned prompt was counted exactly, so it never exceeds
    the budget. Returns ``(n, built, tokens)``.
    """
    built_lo = build(minimum)
    tokens_lo = count_tokens(tokenizer, built_lo.text)
    if tokens_lo > budget:
        raise ValueError(
            f"length too small for {what}: the prompt with the smallest haystack already has {tokens_lo} "
            f"tokens, more than the {budget} tokens left for it"
        )
    tokens_min = tokens_lo
    n_lo, n_hi, tokens_hi = minimum, None, None
    last = (minimum, tokens_lo)
    if hint is not None and hint > minimum:
        guess = hint
    else:
        # Characters per unit cost nothing to measure; assume ~3 characters per token for the probe and
        # keep the probe modest (16K tokens) so that the rate estimate is cheap even for 1M budgets.
        chars_lo = len(built_lo.text)
        chars_per_unit = max((len(build(minimum + 8).text) - chars_lo) / 8, 1e-6)
        guess = minimum + max(1, int(min(budget - tokens_lo, 16384) * 3 / chars_per_unit))
    for _ in range(100):
        # Within 0.1% of the budget (at most 64 tokens): another full encode would not buy anything.
        if budget - tokens_lo < min(64, budget // 1000):
            break
        if n_hi is not None:
            # Fewer free tokens than an average unit costs: one more unit would not fit.
            if n_hi - n_lo <= 1 or budget - tokens_lo < (tokens_hi - tokens_lo) / (n_hi - n_lo):
                break
            guess = min(max(guess, n_lo + 1), n_hi - 1)
        else:
            guess = max(guess, n_lo + 1)
        built = build(guess)
        tokens = count_tokens(tokenizer, built.text)
        if tokens <= budget:
            n_lo, tokens_lo, built_lo = guess, tokens, built
        else:
            n_hi, tokens_hi = guess, tokens
        # Secant through the last two counts; fall back to the bracket when they coincide.
        previous = last
        last = (guess, tokens)
        if previous[0] != guess and tokens != previous[1]:
            rate = (tokens - previous[1]) / (guess - previous[0])
        elif n_hi is not None:
            rate = (tokens_hi - tokens_lo) / (n_hi - n_lo)
        else:
            rate = max((tokens_lo - tokens_min) / max(n_lo - minimum, 1), 1)
        rate = max(rate, 1e-6)
        target = guess + (budget - tokens) / rate
        # Aim a little below the budget when coming from above so the next count lands inside.
        next_guess = int(target) if tokens <= budget else int(target) - 1
        if n_hi is not None and not (n_lo < next_guess < n_hi):
            next_guess = (n_lo + n_hi) // 2
        elif n_hi is not None and next_guess == guess:
            next_guess = (n_lo + n_hi) // 2
        guess = next_guess
    return n_lo, built_lo, tokens_lo


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all for one sample: the share of answers found in the prediction."""
    if not answers:
        raise ValueError("answers must not be empty")
    low = prediction.lower()
    return sum(1.0 for a in answers if a.lower() in low) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part for one sample: 1 if any answer is found in the prediction."""
    if not answers:
        raise ValueError("answers must not be empty")
    low = prediction.lower()
    return 1.0 if any(a.lower() in low for a in answers) else 0.0


def postprocess_prediction(text: str) -> str:
    """RULER's postprocess_pred: strip, and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


# ---------------------------------------------------------------------------------------------------
# Shipped text


def _read_data(name: str) -> str:
    return (Path(__file__).parent / "data" / name).read_text(encoding="utf-8")


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


@cache
def word_list(kind: str) -> tuple[str, ...]:
    """Shipped English words: ``adjectives``, ``nouns`` or ``verbs`` (sorted, unique)."""
    return tuple(sorted(set(_strip_comments(_read_data(f"{kind}.txt")).split())))


@cache
def essay_paragraphs() -> tuple[str, ...]:
    """Paragraphs of the shipped essays (``data/essays.txt``, original prose, MIT), titles included."""
    text = _strip_comments(_read_data("essays.txt"))
    return tuple(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


class _EssayStream:
    """The essay haystack as a word stream, repeated as far as needed.

    The first pass is the essays in order; each further pass shuffles the paragraphs with a fixed seed so
    long haystacks do not repeat verbatim. The stream is a fixed text (independent of the eval seed),
    as RULER's Paul Graham haystack is.
    """

    def __init__(self) -> None:
        self.words: list[str] = []
        # sentence_starts[i] = index of the first word of sentence i; sentences never span paragraphs.
        self.sentence_starts: list[int] = []
        self._passes = 0

    def ensure(self, num_words: int) -> None:
        paragraphs = list(essay_paragraphs())
        while len(self.words) < num_words:
            order = list(range(len(paragraphs)))
            if self._passes:
                random.Random(f"essay-pass-{self._passes}").shuffle(order)
            self._passes += 1
            for p in order:
                start_new = True
                for word in paragraphs[p].split(" "):
                    if start_new:
                        self.sentence_starts.append(len(self.words))
                    self.words.append(word)
                    start_new = word[-1] in ".!?"


_ESSAY = _EssayStream()


def essay_haystack(num_words: int, needles: Sequence[str], depths: Sequence[float]) -> str:
    """The first ``num_words`` essay words with ``needles`` inserted at sentence boundaries.

    ``depths`` are fractions in [0, 1]: needle i goes before sentence ``int(num_sentences * depth)``,
    the placement RULER uses (``depth / 100`` of the sentence count).
    """
    _ESSAY.ensure(num_words)
    words = _ESSAY.words
    num_sentences = bisect.bisect_left(_ESSAY.sentence_starts, num_words)
    cuts = []
    for depth in depths:
        sentence = int(num_sentences * depth)
        cuts.append(_ESSAY.sentence_starts[sentence] if sentence < num_sentences else num_words)
    order = sorted(range(len(needles)), key=lambda i: cuts[i])
    pieces, start = [], 0
    for i in order:
        if cuts[i] > start:
            pieces.append(" ".join(words[start : cuts[i]]))
        pieces.append(needles[i])
        start = cuts[i]
    if start < num_words:
        pieces.append(" ".join(words[start:num_words]))
    return " ".join(pieces)


_SYLLABLES_ONSET = (
    "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr r s sh sk sl st t th tr v w z".split()
)
_SYLLABLES_VOWEL = "a e i o u ai ea ee oa ou".split()
_SYLLABLES_CODA = ["", "", "", "n", "r", "l", "m", "s", "t", "nd", "rk", "st", "ck"]


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word (for names and for word lists longer than the shipped ones)."""
    return "".join(
        rng.choice(_SYLLABLES_ONSET) + rng.choice(_SYLLABLES_VOWEL) + rng.choice(_SYLLABLES_CODA)
        for _ in range(syllables)
    )


class PseudoWords:
    """A fixed, growing list of distinct made-up words that avoid the shipped English words."""

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)
        self._seen: set[str] | None = None
        self.words: list[str] = []

    def take(self, count: int) -> list[str]:
        if self._seen is None:
            self._seen = set(word_list("adjectives")) | set(word_list("nouns")) | set(word_list("verbs"))
        while len(self.words) < count:
            word = pseudo_word(self._rng, self._rng.choice((2, 2, 3)))
            if word not in self._seen:
                self._seen.add(word)
                self.words.append(word)
        return self.words[:count]


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"3000"`` -> 3000 (k and m are powers of 1024, as RULER)."""
    spec = text.strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([km]?)", spec)
    if not match:
        raise ValueError(f"length {text!r} is not a token count like 4096, 4k, 128k or 1m")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]
    value = float(match.group(1)) * scale
    if value != int(value) or value < 1:
        raise ValueError(f"length {text!r} must be a whole, positive number of tokens")
    return int(value)


def parse_lengths(spec: str | Sequence[int | str]) -> list[int]:
    """Parse ``"4k,32k,128k,1m"`` (or a list of ints/strings) into sorted, unique token counts."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    lengths = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"lengths must be ints or strings like '4k', got {item!r}")
        if isinstance(item, int):
            if item < 1:
                raise ValueError(f"length {item} must be a positive number of tokens")
            lengths.append(item)
        elif isinstance(item, str):
            if item.strip():
                lengths.append(parse_length(item))
        else:
            raise TypeError(f"lengths must be ints or strings like '4k', got {type(item).__name__} {item!r}")
    if not lengths:
        raise ValueError(f"lengths {spec!r} names no length; expected e.g. '4k,32k,128k'")
    return sorted(set(lengths))


def format_length(length: int) -> str:
    if length % (1024 * 1024) == 0:
        return f"{length // (1024 * 1024)}m"
    if length % 1024 == 0:
        return f"{length // 1024}k"
    return str(length)
