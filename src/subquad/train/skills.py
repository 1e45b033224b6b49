"""Generated long-range skill documents: recall, copying and lookups hidden in real text.

Each document is real corpus text (the filler) with a few planted facts, and a question at the end
whose answer is only found by reading back far into the document:

- ``recall``: registry lines (``@set key := value`` and two other notations) scattered through the
  text; the end asks for one key's value.
- ``copy``: one to three tagged clips of random pseudo-words early on; the end asks to replay one.
- ``lookup``: a small table (markdown, CSV, TOML or a Python dict) near the start; the end asks
  for one cell.
- ``facts``: one to eight English sentences, each stating an attribute (a serial, a room number, a
  "ledger code" made from the filler's words, ...) of a different named key, at random depths; a
  quiz at the end asks in English about one or more keys, earlier questions answered in place, the
  last ending with an answer prefix, so the value is the sentence's continuation after a space.
  Questions are whole wordings or composed (lead, ask, prefix) from many parts; some haystacks are
  a few filler lines repeated, so that continuing the text is never the answer.

The notations and wordings are ours and deliberately unlike the evaluation suite's
(``subquad.eval.ruler`` / ``niah`` / ``mrcr``): no "special magic", no "Question:/Answer:", no
"Prepend ... hash", no chat turns, and none of its word lists, so that evaluation scores measure
generalisation rather than template matching.

``write_skill_mixture`` writes ``skills.bin`` into a corpus directory: a token stream where a
``skill_fraction`` share of tokens are skill documents (answer appended) and the rest are slices of
``train.bin``, all separated by ``<|eos|>``; the filler comes from ``train.bin`` too, never from the
held-out split. It is written in shards by parallel processes; the result does not depend on their
number.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import shutil
import string
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from subquad.train.data import EOS, load_meta, load_split

SKILL_KINDS: tuple[str, ...] = ("recall", "copy", "lookup", "facts")

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_RECALL_NOTATIONS = (
    # (definition, query): the query ends with a newline and the answer follows it.
    ("@set {key} := {value}", "@get {key}\n"),
    ('registry["{key}"] = "{value}"', '>>> registry["{key}"]\n'),
    ("{key} ~> {value}", "resolve {key} ~>\n"),
)
_COLUMNS = ("port", "owner", "zone", "build", "quota", "codename")


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))


def _key(rng: random.Random) -> str:
    return f"{_pseudo_word(rng)}_{rng.randint(10, 9999)}"


def _value(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return str(rng.randint(100000, 9999999))
    if form == 1:
        return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(6, 10)))
    return f"{_pseudo_word(rng)}-{_pseudo_word(rng)}"


def _cell(rng: random.Random, column: str) -> str:
    if column in ("port", "quota", "build"):
        return str(rng.randint(1000, 99999))
    if column == "zone":
        return f"{rng.choice(['eu', 'us', 'ap', 'sa'])}-{_pseudo_word(rng)}-{rng.randint(1, 9)}"
    return _pseudo_word(rng) + _pseudo_word(rng)


def _filler_lines(filler_text: str, length_chars: int, rng: random.Random) -> list[str]:
    """About ``length_chars`` characters of ``filler_text`` as lines, from a random line start (wrapping)."""
    if not filler_text.strip():
        raise ValueError("filler_text is empty: skill documents need real text around the planted facts")
    lines = filler_text.splitlines()
    start = rng.randrange(len(lines))
    out, used, i = [], 0, start
    while used < length_chars:
        line = lines[i % len(lines)]
        out.append(line)
        used += len(line) + 1
        i += 1
    return out


def _insert_at_depths(
    lines: list[str], planted: list[str], rng: random.Random, low: float, high: float
) -> None:
    positions = sorted(int(len(lines) * rng.uniform(low, high)) for _ in planted)
    for offset, (pos, text) in enumerate(zip(positions, planted)):
        lines.insert(pos + offset, text)


def _recall(lines: list[str], rng: random.Random) -> tuple[str, str, list]:
    definition, query = rng.choice(_RECALL_NOTATIONS)
    keys: dict[str, str] = {}
    count = rng.randint(2, 12)
    while len(keys) < count:
        keys[_key(rng)] = _value(rng)
    planted = [definition.format(key=k, value=v) for k, v in keys.items()]
    rng.shuffle(planted)
    _insert_at_depths(lines, planted, rng, 0.0, 1.0)
    key = rng.choice(list(keys))
    return "\n".join(lines) + "\n" + query.format(key=key), keys[key], []


def _copy(lines: list[str], rng: random.Random) -> tuple[str, str, list]:
    clips: dict[str, str] = {}
    count = rng.randint(1, 3)
    while len(clips) < count:
        words = [
            _pseudo_word(rng) if rng.random() < 0.85 else str(rng.randint(0, 999))
            for _ in range(rng.randint(6, 30))
        ]
        clips["".join(rng.choices(string.ascii_uppercase, k=3))] = " ".join(words)
    planted = [f"~~ clip {tag} begin ~~\n{text}\n~~ clip {tag} end ~~" for tag, text in clips.items()]
    _insert_at_depths(lines, planted, rng, 0.0, 0.8)
    tag = rng.choice(list(clips))
    return "\n".join(lines) + f"\n~~ replay clip {tag} ~~\n", clips[tag], []


def _table(rng: random.Random) -> tuple[str, list[str], list[list[str]], str]:
    name = _pseudo_word(rng) + "_" + rng.choice(["hosts", "services", "nodes", "accounts", "jobs"])
    columns = rng.sample(_COLUMNS, rng.randint(2, 4))
    rows: dict[str, list[str]] = {}
    count = rng.randint(3, 10)
    while len(rows) < count:
        rows[_key(rng)] = [_cell(rng, c) for c in columns]
    body = [[k, *v] for k, v in rows.items()]
    style = rng.randrange(4)
    if style == 0:
        text = f"Table {name}:\n| id | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1) + "\n"
        text += "\n".join("| " + " | ".join(r) + " |" for r in body)
    elif style == 1:
        text = f"{name}.csv\nid," + ",".join(columns) + "\n" + "\n".join(",".join(r) for r in body)
    elif style == 2:
        text = "\n\n".join(
            f"[{name}.{r[0]}]\n" + "\n".join(f'{c} = "{x}"' for c, x in zip(columns, r[1:])) for r in body
        )
    else:
        text = (
            f"{name} = {{\n"
            + "\n".join(
                f'    "{r[0]}": {{' + ", ".join(f'"{c}": "{x}"' for c, x in zip(columns, r[1:])) + "},"
                for r in body
            )
            + "\n}"
        )
    return name, columns, body, text


def _lookup(lines: list[str], rng: random.Random) -> tuple[str, str, list]:
    name, columns, body, table = _table(rng)
    _insert_at_depths(lines, [table], rng, 0.0, 0.3)
    row = rng.choice(body)
    column = rng.randrange(len(columns))
    query = f"-- from {name}, {columns[column]} of {row[0]}:\n"
    return "\n".join(lines) + "\n" + query, row[1 + column], []


# ``facts``: English statements of one attribute of a named key, and an English question about one key.
_FACT_ATTRIBUTES = (
    "access code",
    "room number",
    "serial",
    "pin",
    "ticket number",
    "locker",
    "batch id",
    "checksum",
    "extension",
    "voucher",
    "tracking number",
    "badge number",
    "desk number",
    "reference code",
)
# Attributes made of a word of the filler and one of these nouns ("ledger code", "amber parser tag"),
# so that the model learns to match whatever names the value, not a fixed list of attributes.
_ATTRIBUTE_NOUNS = ("number", "code", "id", "value", "tag", "label", "figure", "token", "string", "key")
# Each ``{value}`` follows a space, so that `` value`` (the answer) appears verbatim in the statement.
_FACT_STATEMENTS = (
    "Note: the {attr} of {key} is {value}.",
    "For the record, {key} was given {attr} {value}.",
    "{Key} -- {attr}: {value}",
    "Keep in mind that the {attr} for {key} is {value}.",
    "Log entry: {key} received {attr} {value}.",
    "The {attr} assigned to {key} reads {value}.",
    "According to the front desk, {key} has {attr} {value} on file.",
    "Reminder -- the {attr} we use for {key} is {value}, effective today.",
    "We wrote down {value} as the {attr} for {key}.",
    "After the audit, {key} kept {attr} {value} and nothing else changed.",
    "({Key} uses {attr} {value}.)",
    "Please file {value} under the {attr} of {key}.",
    "In short, {key} has the {attr} {value}.",
    "Update from the office: {key} now carries {attr} {value}.",
    "Among the {attrs} listed here, the one for {key} is {value}.",
    "The {attr} for {key} is {value}.",
    "Set the {attr} of {key} to {value}.",
    "{Key} is listed with {attr} {value}.",
    "If anyone asks, the {attr} for {key} is {value}.",
    "Remember the {attr} of {key}: it is {value}.",
)
# Composed statements: [lead] subject verb value [tail], or, after a lead, the value first ("Note:
# 5830174 is the locker of ferry-options."): some 19,000 distinct forms, so that the model learns to
# take the value that follows whatever names the key rather than a list of sentences. `nano-p3c`,
# trained on the 20 wordings above only, lost a value stated with a colon after "is" or as "one of
# the <attr>s" (benchmarks/NOTES.md, item 53).
_STATEMENT_LEADS = (
    "Note: ", "For the record, ", "By the way, ", "Also, ", "As it turns out, ", "Worth knowing: ",
    "Officially, ", "Heads up: ", "In the latest update, ", "To be clear, ", "Just so you know, ",
)  # fmt: skip
_STATEMENT_SUBJECTS = (
    "the {attr} for {key}", "the {attr} of {key}", "the {attr} assigned to {key}", "{key}'s {attr}",
    "the {attr} that goes with {key}", "one {attr} of {key}",
    "the only {attr} for {key}", "the current {attr} of {key}", "the {attr} given to {key}",
    "among {key}'s {attrs}, one", "the first of the {attrs} for {key}", "the {attr} we keep for {key}",
    "the last {attr} issued to {key}",
)  # fmt: skip
_STATEMENT_VERBS = (
    " is", " is:", " was", " was:", " =", ":", " reads", " is set to", " equals", " ->",
    " is listed as", " has the value", " is now", " stays", " remains",
)  # fmt: skip
_STATEMENT_TAILS = (".", ".", ".", "", ";", ", as agreed.", " (checked twice).", "!")
# Whole questions, each ending with an answer prefix: the value is the continuation after a space.
_FACT_QUESTIONS = (
    "Looking back over the notes above, which {attr} did {key} get? The {attr} that {key} got is",
    "Recall the {attr} for {key} from earlier. It was",
    "What was recorded as the {attr} of {key}? Recorded {attr} of {key}:",
    "The {attr} of {key}, as noted earlier in this document, is",
    "Scrolling back up, find the {attr} that goes with {key}. That {attr} is",
    "Someone asks for the {attr} of {key}. Checking the earlier entry, we tell them it is",
    "Which {attr} belongs to {key}? Going by the text above, {key} has {attr}",
    "To finish the report, copy the {attr} of {key} from above:",
    "Earlier on, a value was set down as the {attr} of {key}; that value was",
    "{Key} needs its {attr} again. Per the earlier note, it is",
)
# Composed questions: [lead] [ask] prefix, the prefix naming the attribute and the key again, then a
# phrase pointing back, then the verb ("The ledger code for brisk-parser noted earlier was").
_QUESTION_LEADS = (
    "Now, back to the notes above.",
    "One last check on what came before.",
    "A question about the text so far.",
    "Before closing, go back over the entries above.",
    "Time to look something up.",
    "Check the earlier lines for this one.",
)
_QUESTION_ASKS = (
    "Which {attr} goes with {key}?",
    "What was the {attr} of {key}?",
    "Do you remember the {attr} for {key}?",
    "Can you find the {attr} {prep} {key}{trail}?",
    "What {attr} did {key} have?",
    "Where is the {attr} of {key}{trail}?",
)
_PREFIX_PREPS = ("for", "of", "assigned to", "that belongs to")
_PREFIX_TRAILS = (
    "", " above", " given earlier", " noted earlier", " in these notes", " from before",
    " written down above", " in this document", " stated earlier", " we saw above",
    " from the text above", " recorded earlier",
)  # fmt: skip
_PREFIX_VERBS = (" is", " was", " reads", " is listed as", " =", ":")
# An optional first line of the document announcing the facts (no evaluation wording).
_FACT_INTROS = (
    "The text below includes a few records, each for a different name; they come up again at the end.",
    "Several entries are scattered through these pages. Some will be asked about at the end.",
    "Read carefully: a handful of values are noted below, among other things.",
    "Somewhere in what follows, a few names are paired with values.",
    "This document mixes ordinary text with a few recorded values.",
)
_WORD = re.compile(r"\b[A-Za-z]{4,10}\b")
# Words never used in keys: our templates' and attributes' own words (a key must not echo the
# question's wording), common function words, and words of the evaluation templates.
_OUR_WORDINGS = (
    _FACT_STATEMENTS + _FACT_QUESTIONS + _FACT_ATTRIBUTES + _ATTRIBUTE_NOUNS + _QUESTION_LEADS
    + _QUESTION_ASKS + _PREFIX_PREPS + _PREFIX_TRAILS + _PREFIX_VERBS + _FACT_INTROS + _STATEMENT_LEADS
    + _STATEMENT_SUBJECTS + _STATEMENT_VERBS + _STATEMENT_TAILS
)  # fmt: skip
_KEY_STOPWORDS = (
    frozenset(w.lower() for t in _OUR_WORDINGS for w in _WORD.findall(t))
    | frozenset(
        "that this these those them then than they their there here where when what which while with"
        " from into onto over under about after before also only some such each every other more most"
        " very just have been were will would could should shall must does done self none true false"
        " return import class else elif pass".split()
    )
    | frozenset("special magic hidden memorize quiz question answer mentioned provided".split())
)
_MIN_KEY_WORDS = 6


def _key_words(lines: list[str], rng: random.Random) -> list[str]:
    """Distinct lower-cased alphabetic words of 4-10 letters from the filler, topped up with pseudo-words."""
    words = list(dict.fromkeys(w.lower() for line in lines for w in _WORD.findall(line)))
    words = [w for w in words if w not in _KEY_STOPWORDS]
    while len(words) < _MIN_KEY_WORDS:
        word = _pseudo_word(rng) + _pseudo_word(rng)
        if word not in words:
            words.append(word)
    return words


def _fact_key(words: list[str], form: int, rng: random.Random) -> str:
    first, second = rng.sample(words, 2)
    if form == 0:
        return f"{first}-{second}"  # brisk-parser
    if form == 1:
        return f"the {first} {second}"  # the amber ledger
    if form == 2:
        return f"{first} {rng.randint(2, 999)}"  # ledger 41
    if form == 3:
        return f"{first.capitalize()} {second.capitalize()}"  # Parser Mill
    return f"{first} #{rng.randint(2, 999)}"  # ledger #41


# Value forms: digits, lower-case alphanumerics, uuids. Long uuids are the hardest to copy back exactly.
_VALUE_FORM_WEIGHTS = (0.6, 0.1, 0.3)


def _fact_value(form: int, rng: random.Random) -> str:
    if form == 0:
        digits = rng.choice((5, 6, 7, 7, 7, 7, 8, 9))
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if form == 1:
        return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(6, 10)))
    hexa = f"{rng.getrandbits(128):032x}"
    return f"{hexa[:8]}-{hexa[8:12]}-{hexa[12:16]}-{hexa[16:20]}-{hexa[20:]}"


def _fill_fact(template: str, key: str, attr: str, value: str = "", **extra: str) -> str:
    # "{Key}" starts a sentence: "the amber ledger" -> "The amber ledger"; other forms keep their case.
    capital = "The" + key[3:] if key.startswith("the ") else key
    return template.format(key=key, Key=capital, attr=attr, attrs=attr + "s", value=value, **extra)


def _fact_attribute(words: list[str], keys: list[str], rng: random.Random) -> str:
    """A fixed attribute ("room number"), or one or two filler words and a noun ("amber ledger code").
    Words of ``keys`` already drawn are not used, and the words used are removed from ``words``, so
    that no question names another fact's key inside its attribute."""
    in_keys = {w.lower() for key in keys for w in _WORD.findall(key)}
    free = [w for w in words if w not in in_keys]
    if rng.random() < 0.5 or len(free) < _MIN_KEY_WORDS + 2:
        return rng.choice(_FACT_ATTRIBUTES)
    picked = rng.sample(free, 1 if rng.random() < 0.7 else 2)
    for word in picked:
        words.remove(word)
    return " ".join([*picked, rng.choice(_ATTRIBUTE_NOUNS)])


def _fact_statement(key: str, attr: str, value: str, rng: random.Random) -> str:
    """One sentence stating ``key``'s ``attr`` = ``value`` (`` value`` verbatim in it): 40% a whole
    sentence from ``_FACT_STATEMENTS``, 60% composed from a lead, a subject, a verb and a tail."""
    if rng.random() < 0.4:
        return _fill_fact(rng.choice(_FACT_STATEMENTS), key, attr, value)
    subject, tail = rng.choice(_STATEMENT_SUBJECTS), rng.choice(_STATEMENT_TAILS)
    if rng.random() < 0.2:  # value first; the lead keeps a space before the value
        verb = rng.choice((" is", " was", " is now", " stays"))
        template = f"{rng.choice(_STATEMENT_LEADS)}{{value}}{verb} {subject}{tail}"
    else:
        lead = rng.choice(_STATEMENT_LEADS) if rng.random() < 0.5 else ""
        template = f"{lead}{subject}{rng.choice(_STATEMENT_VERBS)} {{value}}{tail}"
    text = _fill_fact(template, key, attr, value)
    # A sentence opens with a capital, but a key keeps its own case ("ferry-options's pin is ...").
    if not text.startswith(key) or key.startswith("the "):
        text = text[0].upper() + text[1:]
    return text


def _fact_question(key: str, attr: str, rng: random.Random) -> str:
    """One question about ``key``'s ``attr`` ending with an answer prefix (no trailing space): a whole
    question from ``_FACT_QUESTIONS`` or one composed of a lead, an ask and a prefix."""
    if rng.random() < 0.4:
        return _fill_fact(rng.choice(_FACT_QUESTIONS), key, attr)
    prep, trail = rng.choice(_PREFIX_PREPS), rng.choice(_PREFIX_TRAILS)
    prefix = _fill_fact(f"The {{attr}} {prep} {{key}}{trail}{rng.choice(_PREFIX_VERBS)}", key, attr)
    parts = [prefix]
    if rng.random() < 0.7:
        parts.insert(0, _fill_fact(rng.choice(_QUESTION_ASKS), key, attr, prep=prep, trail=trail))
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(_QUESTION_LEADS))
    return (" " if rng.random() < 0.8 else "\n").join(parts)


def _repetitive(lines: list[str], rng: random.Random) -> list[str]:
    """A haystack of 1-5 consecutive filler lines repeated to about the same length: the pattern to
    continue is everywhere, the value only once, so the answer has to come from reading back."""
    text_lines = [i for i, line in enumerate(lines) if line.strip()]
    if not text_lines:
        return lines
    start = rng.choice(text_lines)
    unit = [line for line in lines[start : start + rng.randint(1, 5)] if line.strip()]
    size, total, out = sum(len(line) + 1 for line in unit), sum(len(line) + 1 for line in lines), []
    for _ in range(max(1, total // size)):
        out.extend(unit)
    return out


def _facts_document(lines: list[str], rng: random.Random) -> tuple[str, str, dict]:
    """``_facts`` with what it planted: ``{"facts": {key: (attr, value)}, "quiz": [asked keys],
    "asked": the last, "answer_spans": [(start, end) of each earlier quiz answer in the document],
    "statements": {key: the sentence stating it}, "repetitive": whether the haystack is a few filler
    lines repeated}``."""
    words = _key_words(lines, rng)
    repetitive = rng.random() < 0.25
    if repetitive:
        lines = _repetitive(lines, rng)
    key_form = rng.randrange(5) if rng.random() < 0.85 else None  # None: a form per key
    value_form = rng.choices((0, 1, 2), _VALUE_FORM_WEIGHTS)[0] if rng.random() < 0.8 else None
    shared_attr = _fact_attribute(words, [], rng) if rng.random() < 0.75 else None
    facts: dict[str, tuple[str, str]] = {}
    count = rng.randint(1, 8)
    attempts = 0
    while len(facts) < count:
        attempts += 1
        if attempts % 50 == 0:  # a tiny vocabulary: widen it rather than loop
            words.append(_pseudo_word(rng) + _pseudo_word(rng))
        form = rng.randrange(5) if key_form is None else key_form
        key = _fact_key(words, form, rng)
        # No key inside another ("ledger 4" / "ledger 41"): the asked key names exactly one fact.
        if any(key.lower() in k.lower() or k.lower() in key.lower() for k in facts):
            continue
        value = _fact_value(
            rng.choices((0, 1, 2), _VALUE_FORM_WEIGHTS)[0] if value_form is None else value_form, rng
        )
        if any(value == v for _, v in facts.values()):
            continue
        facts[key] = (shared_attr or _fact_attribute(words, [*facts, key], rng), value)
    statements = {key: _fact_statement(key, attr, value, rng) for key, (attr, value) in facts.items()}
    planted = list(statements.values())
    _insert_at_depths(lines, planted, rng, 0.0, 1.0)
    # Half the sentences after a line of prose run on from it, like a sentence inside a paragraph.
    for text in planted:
        at = lines.index(text)
        if at > 0 and lines[at - 1].rstrip().endswith((".", "!", "?")) and rng.random() < 0.5:
            lines[at - 1] = lines[at - 1].rstrip() + " " + lines.pop(at)
    if rng.random() < 0.35:
        lines.insert(0, rng.choice(_FACT_INTROS))
    # A quiz at the end: half the documents ask about every fact, the others about 1..n of them, each
    # question answered in turn (answer, full stop, newline) but the last, whose answer is the target.
    keys = list(facts)
    rng.shuffle(keys)
    quiz = keys if rng.random() < 0.5 else keys[: rng.randint(1, len(keys))]
    separator = "\n\n" if rng.random() < 0.3 else "\n"
    document = "\n".join(lines) + separator
    answer_spans = []
    for i, key in enumerate(quiz):
        attr, value = facts[key]
        document += _fact_question(key, attr, rng)
        if i < len(quiz) - 1:
            answer_spans.append((len(document), len(document) + 1 + len(value)))
            document += f" {value}.\n"
    answer = " " + facts[quiz[-1]][1]
    planted = {"facts": facts, "quiz": quiz, "asked": quiz[-1], "answer_spans": answer_spans}
    return document, answer, {**planted, "statements": statements, "repetitive": repetitive}


def _facts(lines: list[str], rng: random.Random) -> tuple[str, str, list]:
    document, answer, planted = _facts_document(lines, rng)
    return document, answer, planted["answer_spans"]


_MAKERS = {"recall": _recall, "copy": _copy, "lookup": _lookup, "facts": _facts}


def _skill_text(kind: str, filler_text: str, length_chars: int, rng: random.Random) -> tuple[str, list]:
    """``make_skill_document``'s ``document + answer`` (same rng draws) and the character spans of
    every answer in it: the final one and any earlier ones answered in place (a facts quiz)."""
    document, answer, inner = _MAKERS[kind](_filler_lines(filler_text, length_chars, rng), rng)
    return document + answer, [*inner, (len(document), len(document) + len(answer))]


def answer_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """``uint8`` per token: 1 where the token's characters (``offsets``, as ``tokenizers`` gives them)
    overlap one of the answer ``spans``, else 0."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not offsets:
        return mask
    starts = np.array([o[0] for o in offsets])
    ends = np.array([o[1] for o in offsets])
    for lo, hi in spans:
        mask[(starts < hi) & (ends > lo)] = 1
    return mask


def make_skill_document(
    kind: str, filler_text: str, length_chars: int, rng: random.Random
) -> tuple[str, str]:
    """One skill document of about ``length_chars`` characters: ``(document_with_question, answer)``.

    The document ends with the question; ``document + answer`` is the training text. For ``recall``,
    ``copy`` and ``lookup`` the question ends with a newline and the answer is the next line; for
    ``facts`` it ends with an English answer prefix (no trailing space) and the answer is the value
    with a leading space. The answer appears verbatim earlier in the document. Deterministic given
    ``rng``'s state.
    """
    if kind not in _MAKERS:
        raise ValueError(f"skill kind {kind!r} is unknown; expected one of {', '.join(SKILL_KINDS)}")
    if length_chars <= 0:
        raise ValueError(f"length_chars must be positive, got {length_chars}")
    document, answer, _ = _MAKERS[kind](_filler_lines(filler_text, length_chars, rng), rng)
    return document, answer


def _filler_from(ids: np.ndarray, tokenizer: Tokenizer, eos: int, num_tokens: int, rng: random.Random) -> str:
    start = rng.randrange(max(1, len(ids) - num_tokens))
    window = np.asarray(ids[start : start + num_tokens], dtype=np.int64)
    # Documents inside the window stay separate paragraphs instead of running into each other.
    cuts = np.flatnonzero(window == eos)
    pieces = np.split(window, cuts)
    return "\n\n".join(tokenizer.decode([int(t) for t in p if t != eos]) for p in pieces)


_PROSE_WORD = re.compile(r"[A-Za-z][a-z]*[.,;:!?]?")
_PROSE_TRIES = 32  # windows read for one prose haystack before falling back to plain filler


def prose_line(line: str) -> str | None:
    """``line`` as English prose (comment markers stripped) if it reads like a sentence: at least six
    words, 85% of them plain words; else None. Code, tables and data lines are rejected."""
    text = line.strip().lstrip("#*/-> ").strip()
    words = text.split()
    if len(words) < 6 or sum(bool(_PROSE_WORD.fullmatch(w)) for w in words) < 0.85 * len(words):
        return None
    return text


def _prose_from(ids: np.ndarray, tokenizer: Tokenizer, eos: int, num_tokens: int, rng: random.Random) -> str:
    """About ``num_tokens`` tokens of English prose gathered from the corpus's comments, docstrings and
    docs (``prose_line``), two to six lines to a paragraph, so that a haystack can read like essays
    rather than code. Falls back to plain filler where the corpus holds too little prose."""
    lines: list[str] = []
    target = 4 * num_tokens  # characters: English runs at about 4 per token
    for _ in range(_PROSE_TRIES):
        window = _filler_from(ids, tokenizer, eos, 4096, rng)
        lines += [text for text in map(prose_line, window.splitlines()) if text]
        if sum(len(line) + 1 for line in lines) >= target:
            break
    else:
        return _filler_from(ids, tokenizer, eos, num_tokens, rng)
    paragraphs, used, chars = [], 0, 0
    while chars < target:
        size = rng.randint(2, 6)
        paragraphs.append(" ".join(lines[used : used + size]))
        chars += len(paragraphs[-1]) + 1
        used += size
    return "\n".join(paragraphs)


def answers_path(tokens_path: str | Path) -> Path:
    """The answer mask beside a skill token file: ``skills.bin`` -> ``skills_answers.bin``."""
    path = Path(tokens_path)
    return path.with_name(f"{path.stem}_answers.bin")


# Skill files are written in shards of this many tokens, each from its own seed, so that the
# output does not depend on how many processes write them.
SHARD_TOKENS = 2_000_000
_SHARD_COUNTS = ("skill_tokens", "answer_tokens", "text_tokens", "text_slices")


def _write_shard(
    corpus: Path,
    part: Path,
    num_tokens: int,
    skill_fraction: float,
    weights: dict[str, float],
    doc_tokens: tuple[int, int],
    seed: int | str,
    prose_share: float = 0.0,
) -> dict:
    """One shard of ``write_skill_mixture``: ``num_tokens`` tokens to ``part`` and its answer mask."""
    low, high = doc_tokens
    meta = load_meta(corpus)
    train = load_split(corpus, "train")
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    # Literal "<|eos|>" inside filler text stays text, as in build_corpus.
    tokenizer.encode_special_tokens = True
    eos = tokenizer.token_to_id(EOS)
    dtype = np.dtype("<u2") if meta["dtype"] == "uint16" else np.dtype("<u4")
    rng = random.Random(seed)
    kinds, kind_p = list(weights), list(weights.values())
    counts = {
        "skill_tokens": 0, "answer_tokens": 0, "text_tokens": 0,
        "documents": {k: 0 for k in SKILL_KINDS}, "text_slices": 0,
    }  # fmt: skip
    with open(part, "wb") as out, open(answers_path(part), "wb") as answers_out:
        written = 0
        while written < num_tokens:
            length = int(math.exp(rng.uniform(math.log(low), math.log(high))))
            # Token-weighted: whichever side is behind its share gets the next piece, so the mix is exact.
            if counts["skill_tokens"] < skill_fraction * max(1, written) or (skill_fraction == 1):
                kind = rng.choices(kinds, kind_p)[0]
                # No draw at prose_share 0: mixtures without prose stay as they were.
                prose = prose_share > 0 and kind == "facts" and rng.random() < prose_share
                source = _prose_from if prose else _filler_from
                filler = source(train, tokenizer, eos, length, rng)
                # Sized by the filler's own characters: an average bytes-per-token would over- or
                # undershoot on unusual text (non-ASCII, data files) and repeat the filler to fill up.
                text, spans = _skill_text(kind, filler, len(filler), rng)
                encoded = tokenizer.encode(text, add_special_tokens=False)
                ids = np.asarray(encoded.ids + [eos])
                answers = np.append(answer_token_mask(encoded.offsets, spans), np.uint8(0))
                counts["skill_tokens"] += len(ids)
                counts["answer_tokens"] += int(answers.sum())
                counts["documents"][kind] += 1
            else:
                start = rng.randrange(max(1, len(train) - length))
                ids = np.append(np.asarray(train[start : start + length], dtype=np.int64), eos)
                answers = np.zeros(len(ids), dtype=np.uint8)
                counts["text_tokens"] += len(ids)
                counts["text_slices"] += 1
            ids.astype(dtype).tofile(out)
            answers.tofile(answers_out)
            written += len(ids)
    return {"tokens": written, **counts}


def write_skill_mixture(
    corpus_dir: str | Path,
    num_tokens: int,
    skill_fraction: float = 0.25,
    kind_weights: dict[str, float] | None = None,
    doc_tokens: tuple[int, int] = (256, 8192),
    seed: int = 0,
    out_name: str = "skills.bin",
    progress: bool = True,
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    prose_share: float = 0.0,
) -> dict:
    """Write ``corpus_dir/out_name``: about ``num_tokens`` tokens mixing skill documents and real text.

    A ``skill_fraction`` share of the tokens are skill documents (kinds drawn by ``kind_weights``,
    default equal; lengths log-uniform in ``doc_tokens``), the rest are slices of ``train.bin`` of
    the same length range. Everything is eos-separated, in the corpus's dtype. Beside it,
    ``<stem>_answers.bin`` (``uint8``, one per token: 1 on the tokens of every answer, for a trainer's
    ``answer_weight``) and ``<stem>.json`` with the counts; returns that dict.

    A ``prose_share`` of the facts documents get a haystack of English prose lines gathered from the
    corpus (``prose_line``) instead of a plain window of it.

    The file is written in shards of ``shard_tokens`` (the first seeded with ``seed``, shard ``i``
    with ``f"{seed}/{i}"``) by ``workers`` processes (default: one per CPU core, at most one per
    shard); the result is the same for any number of workers.
    """
    if not 0 <= skill_fraction <= 1:
        raise ValueError(f"skill_fraction must be in [0, 1], got {skill_fraction!r}")
    if not 0 <= prose_share <= 1:
        raise ValueError(f"prose_share must be in [0, 1], got {prose_share!r}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    low, high = doc_tokens
    if not 0 < low <= high:
        raise ValueError(f"doc_tokens must be (low, high) with 0 < low <= high, got {doc_tokens!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    weights = kind_weights or {k: 1.0 for k in SKILL_KINDS}
    for kind in weights:
        if kind not in SKILL_KINDS:
            raise ValueError(f"skill kind {kind!r} is unknown; expected one of {', '.join(SKILL_KINDS)}")
    corpus = Path(corpus_dir)
    meta = load_meta(corpus)
    if len(load_split(corpus, "train")) == 0:
        raise ValueError(f"{str(corpus)!r} has an empty train split")

    num_shards = -(-num_tokens // shard_tokens)
    sizes = [num_tokens // num_shards + (i < num_tokens % num_shards) for i in range(num_shards)]
    out_path = corpus / out_name
    parts = [out_path.with_name(f"{out_path.stem}.part{i}{out_path.suffix}") for i in range(num_shards)]
    seeds = [seed] + [f"{seed}/{i}" for i in range(1, num_shards)]
    jobs = [
        (corpus, part, size, skill_fraction, weights, doc_tokens, shard_seed, prose_share)
        for part, size, shard_seed in zip(parts, sizes, seeds)
    ]
    workers = min(workers or os.cpu_count() or 1, num_shards)
    shards: list[dict] = [{}] * num_shards
    try:
        with tqdm(total=num_tokens, desc="skills", unit="tok", disable=not progress) as bar:
            if workers == 1:
                for i, job in enumerate(jobs):
                    shards[i] = _write_shard(*job)
                    bar.update(sizes[i])
            else:
                # spawn, not fork: the parent may hold a tokenizer's thread pool (build_corpus).
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                    futures = {pool.submit(_write_shard, *job): i for i, job in enumerate(jobs)}
                    for future in as_completed(futures):
                        shards[futures[future]] = future.result()
                        bar.update(sizes[futures[future]])
        with open(out_path, "wb") as out, open(answers_path(out_path), "wb") as answers_out:
            for part in parts:
                for src, dst in ((part, out), (answers_path(part), answers_out)):
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, dst, 1 << 24)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
            answers_path(part).unlink(missing_ok=True)
    total = {key: sum(shard[key] for shard in shards) for key in ("tokens", *_SHARD_COUNTS)}
    result = {
        "file": out_name,
        "tokens": total["tokens"],
        "skill_fraction": skill_fraction,
        "measured_skill_fraction": total["skill_tokens"] / total["tokens"],
        "kind_weights": weights,
        "doc_tokens": list(doc_tokens),
        "seed": seed,
        "dtype": meta["dtype"],
        "shards": num_shards,
        "prose_share": prose_share,
        **{key: total[key] for key in _SHARD_COUNTS},
        "documents": {k: sum(shard["documents"][k] for shard in shards) for k in SKILL_KINDS},
    }
    (corpus / f"{Path(out_name).stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
