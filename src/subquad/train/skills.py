"""Generated long-range skill documents: recall, copying and lookups hidden in real text.

Each document is real corpus text (the filler) with a few planted facts, and a question at the end
whose answer is only found by reading back far into the document:

- ``recall``: registry lines (``@set key := value`` and two other notations) scattered through the
  text; the end asks for one key's value.
- ``copy``: one to three tagged clips of random pseudo-words early on; the end asks to replay one.
- ``lookup``: a small table (markdown, CSV, TOML or a Python dict) near the start; the end asks
  for one cell.

The notations are ours and deliberately unlike the evaluation suite's (``subquad.eval.ruler`` /
``mrcr``): no "special magic", no "Question:/Answer:", no "Prepend ... hash", no chat turns, so that
evaluation scores measure generalisation rather than template matching.

``write_skill_mixture`` writes ``skills.bin`` into a corpus directory: a token stream where a
``skill_fraction`` share of tokens are skill documents (answer appended) and the rest are slices of
``train.bin``, all separated by ``<|eos|>``; the filler comes from ``train.bin`` too, never from the
held-out split.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from subquad.train.data import EOS, load_meta, load_split

SKILL_KINDS: tuple[str, ...] = ("recall", "copy", "lookup")

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


def _recall(lines: list[str], rng: random.Random) -> tuple[str, str]:
    definition, query = rng.choice(_RECALL_NOTATIONS)
    keys: dict[str, str] = {}
    count = rng.randint(2, 12)
    while len(keys) < count:
        keys[_key(rng)] = _value(rng)
    planted = [definition.format(key=k, value=v) for k, v in keys.items()]
    rng.shuffle(planted)
    _insert_at_depths(lines, planted, rng, 0.0, 1.0)
    key = rng.choice(list(keys))
    return "\n".join(lines) + "\n" + query.format(key=key), keys[key]


def _copy(lines: list[str], rng: random.Random) -> tuple[str, str]:
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
    return "\n".join(lines) + f"\n~~ replay clip {tag} ~~\n", clips[tag]


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


def _lookup(lines: list[str], rng: random.Random) -> tuple[str, str]:
    name, columns, body, table = _table(rng)
    _insert_at_depths(lines, [table], rng, 0.0, 0.3)
    row = rng.choice(body)
    column = rng.randrange(len(columns))
    query = f"-- from {name}, {columns[column]} of {row[0]}:\n"
    return "\n".join(lines) + "\n" + query, row[1 + column]


_MAKERS = {"recall": _recall, "copy": _copy, "lookup": _lookup}


def make_skill_document(
    kind: str, filler_text: str, length_chars: int, rng: random.Random
) -> tuple[str, str]:
    """One skill document of about ``length_chars`` characters: ``(document_with_question, answer)``.

    The document ends with the question (and a newline); ``document + answer`` is the training text.
    The answer appears verbatim earlier in the document. Deterministic given ``rng``'s state.
    """
    if kind not in _MAKERS:
        raise ValueError(f"skill kind {kind!r} is unknown; expected one of {', '.join(SKILL_KINDS)}")
    if length_chars <= 0:
        raise ValueError(f"length_chars must be positive, got {length_chars}")
    return _MAKERS[kind](_filler_lines(filler_text, length_chars, rng), rng)


def _filler_from(ids: np.ndarray, tokenizer: Tokenizer, eos: int, num_tokens: int, rng: random.Random) -> str:
    start = rng.randrange(max(1, len(ids) - num_tokens))
    window = np.asarray(ids[start : start + num_tokens], dtype=np.int64)
    # Documents inside the window stay separate paragraphs instead of running into each other.
    cuts = np.flatnonzero(window == eos)
    pieces = np.split(window, cuts)
    return "\n\n".join(tokenizer.decode([int(t) for t in p if t != eos]) for p in pieces)


def write_skill_mixture(
    corpus_dir: str | Path,
    num_tokens: int,
    skill_fraction: float = 0.25,
    kind_weights: dict[str, float] | None = None,
    doc_tokens: tuple[int, int] = (256, 8192),
    seed: int = 0,
    out_name: str = "skills.bin",
    progress: bool = True,
) -> dict:
    """Write ``corpus_dir/out_name``: about ``num_tokens`` tokens mixing skill documents and real text.

    A ``skill_fraction`` share of the tokens are skill documents (kinds drawn by ``kind_weights``,
    default equal; lengths log-uniform in ``doc_tokens``), the rest are slices of ``train.bin`` of
    the same length range. Everything is eos-separated, in the corpus's dtype. Also writes
    ``<out_name stem>.json`` with the counts; returns that dict.
    """
    if not 0 <= skill_fraction <= 1:
        raise ValueError(f"skill_fraction must be in [0, 1], got {skill_fraction!r}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    low, high = doc_tokens
    if not 0 < low <= high:
        raise ValueError(f"doc_tokens must be (low, high) with 0 < low <= high, got {doc_tokens!r}")
    weights = kind_weights or {k: 1.0 for k in SKILL_KINDS}
    for kind in weights:
        if kind not in SKILL_KINDS:
            raise ValueError(f"skill kind {kind!r} is unknown; expected one of {', '.join(SKILL_KINDS)}")
    corpus = Path(corpus_dir)
    meta = load_meta(corpus)
    train = load_split(corpus, "train")
    if len(train) == 0:
        raise ValueError(f"{str(corpus)!r} has an empty train split")
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    # Literal "<|eos|>" inside filler text stays text, as in build_corpus.
    tokenizer.encode_special_tokens = True
    eos = tokenizer.token_to_id(EOS)
    dtype = np.dtype("<u2") if meta["dtype"] == "uint16" else np.dtype("<u4")
    chars_per_token = float(meta["bytes_per_token"])

    rng = random.Random(seed)
    kinds, kind_p = list(weights), list(weights.values())
    counts = {"skill_tokens": 0, "text_tokens": 0, "documents": {k: 0 for k in SKILL_KINDS}, "text_slices": 0}
    out_path = corpus / out_name
    with (
        open(out_path, "wb") as out,
        tqdm(total=num_tokens, desc="skills", unit="tok", disable=not progress) as bar,
    ):
        written = 0
        while written < num_tokens:
            length = int(math.exp(rng.uniform(math.log(low), math.log(high))))
            # Token-weighted: whichever side is behind its share gets the next piece, so the mix is exact.
            if counts["skill_tokens"] < skill_fraction * max(1, written) or (skill_fraction == 1):
                kind = rng.choices(kinds, kind_p)[0]
                filler = _filler_from(train, tokenizer, eos, length, rng)
                document, answer = make_skill_document(kind, filler, int(length * chars_per_token), rng)
                ids = np.asarray(tokenizer.encode(document + answer, add_special_tokens=False).ids + [eos])
                counts["skill_tokens"] += len(ids)
                counts["documents"][kind] += 1
            else:
                start = rng.randrange(max(1, len(train) - length))
                ids = np.append(np.asarray(train[start : start + length], dtype=np.int64), eos)
                counts["text_tokens"] += len(ids)
                counts["text_slices"] += 1
            ids.astype(dtype).tofile(out)
            written += len(ids)
            bar.update(len(ids))
    result = {
        "file": out_name,
        "tokens": written,
        "skill_fraction": skill_fraction,
        "measured_skill_fraction": counts["skill_tokens"] / written,
        "kind_weights": weights,
        "doc_tokens": list(doc_tokens),
        "seed": seed,
        "dtype": meta["dtype"],
        **counts,
    }
    (corpus / f"{Path(out_name).stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
