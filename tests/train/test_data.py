"""Corpus building, tokenizers and skill documents, on a small generated tree (CPU, seconds)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from subquad.train import (
    EOS,
    SKILL_KINDS,
    build_corpus,
    load_meta,
    load_split,
    load_tokenizer,
    make_skill_document,
    measure_tokenizers,
    skills,
    write_skill_mixture,
)

# Phrases of the evaluation suite's templates (subquad.eval.ruler / mrcr) that training data must not teach.
EVAL_PHRASES = (
    "special magic",
    "I will quiz you",
    "mentioned in the provided text",
    "Memorize",
    "Question:",
    "Answer:",
    "Prepend",
    "(1 indexed)",
    "VAR ",
    "given documents",
    "User:",
    "Assistant:",
    "One of the",
)


def _texts(rng: random.Random, n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "résumé", "日本語", "λ", "\t", "{", "}", "<|eos|>", "def"]
    texts = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 300)))
        texts.append(f"# file {i}\n{body}\n  trailing  spaces  \n\n")
    return texts


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A source tree: 40 unique text files, 5 duplicates, a binary, a big file, a hidden dir, other junk."""
    root = tmp_path_factory.mktemp("tree")
    rng = random.Random(0)
    unique: dict[str, str] = {}
    for i, text in enumerate(_texts(rng, 40)):
        ext = [".py", ".md", ".txt", ".json"][i % 4]
        path = root / f"pkg{i % 3}" / f"mod{i}{ext}"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        unique[text] = str(path)
    texts = list(unique)
    for i in range(5):
        (root / f"copy{i}.py").write_text(texts[i], encoding="utf-8")
    (root / "blob.py").write_bytes(b"\x00\x01binary\x00" * 10)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "big.txt").write_text("x" * (1 << 20 + 1))
    (root / "image.png").write_bytes(b"\x89PNG....")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.py").write_text("hidden = True\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "mod.py").write_text("cached = True\n")
    return root, unique


@pytest.fixture(scope="module")
def corpora(tree, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root, _ = tree
    out = {}
    for kind in ("bytes", "bpe"):
        path = tmp_path_factory.mktemp(kind)
        meta = build_corpus(
            [root], path, tokenizer=kind, vocab_size=300, heldout_fraction=0.25, progress=False
        )
        out[kind] = (path, meta)
    return out


def _documents(corpus: Path, split: str) -> list[str]:
    tokenizer = load_tokenizer(corpus)
    ids = np.asarray(load_split(corpus, split))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    assert len(ids) == 0 or ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts)]


def test_files_deduplicated_and_skipped(corpora):
    for _, meta in corpora.values():
        files = meta["files"]
        assert files["kept"] == 40
        assert files["duplicates"] == 5
        assert files["skipped_binary"] == 2  # the NUL file and the latin-1 file
        assert files["skipped_large"] == 1
        assert files["skipped_extension"] == 1
        assert files["train"] + files["heldout"] == 40
        assert 0 < files["heldout"] < 40


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_bins_round_trip_to_the_original_texts(corpora, tree, kind):
    path, meta = corpora[kind]
    _, unique = tree
    train, heldout = _documents(path, "train"), _documents(path, "heldout")
    # Exact texts back (byte-level: every string survives), each file in exactly one split.
    assert sorted(train + heldout) == sorted(unique)
    assert not set(train) & set(heldout)
    assert meta["tokens"] == {
        "train": len(load_split(path, "train")),
        "heldout": len(load_split(path, "heldout")),
    }
    assert meta["bytes"]["train"] == sum(len(t.encode()) for t in train)


def test_split_is_by_file_and_the_same_for_both_tokenizers_and_reruns(corpora, tree, tmp_path):
    root, _ = tree
    heldout = {k: sorted(_documents(p, "heldout")) for k, (p, _) in corpora.items()}
    assert heldout["bytes"] == heldout["bpe"]
    build_corpus([root], tmp_path, tokenizer="bytes", heldout_fraction=0.25, progress=False)
    assert sorted(_documents(tmp_path, "heldout")) == heldout["bytes"]
    build_corpus([root], tmp_path, tokenizer="bytes", heldout_fraction=0.25, seed=1, progress=False)
    assert sorted(_documents(tmp_path, "heldout")) != heldout["bytes"]


def test_meta_and_memmap(corpora):
    path, meta = corpora["bpe"]
    assert load_meta(path) == meta
    assert json.loads((path / "meta.json").read_text())["dtype"] == "uint16"
    for key in (
        "vocab_size",
        "dtype",
        "tokenizer",
        "tokens",
        "files",
        "bytes",
        "bytes_per_token",
        "sources",
        "seed",
    ):
        assert key in meta
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300 and meta["seed"] == 0
    assert corpora["bytes"][1]["vocab_size"] == 259
    # Byte tokenizer: one token per byte (plus one eos per document).
    bytes_meta = corpora["bytes"][1]
    assert bytes_meta["tokens"]["train"] == bytes_meta["bytes"]["train"] + bytes_meta["files"]["train"]
    assert meta["bytes_per_token"] > bytes_meta["bytes_per_token"]
    ids = load_split(path, "train")
    assert isinstance(ids, np.memmap) and ids.dtype == np.dtype("<u2")
    with pytest.raises(ValueError):
        ids[0] = 1
    assert int(ids.max()) < meta["vocab_size"]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_auto_tokenizer_loads_and_round_trips(corpora, kind):
    path, _ = corpora[kind]
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    assert (
        tokenizer.eos_token == EOS and tokenizer.bos_token == "<|bos|>" and tokenizer.pad_token == "<|pad|>"
    )
    text = "def f(x):\n    return  x ** 2  # résumé 日本 \x01\n\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    if kind == "bytes":
        assert len(ids) == len(text.encode())
        assert tokenizer("<|eos|>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


def test_max_bytes_caps_the_corpus(tree, tmp_path):
    root, unique = tree
    meta = build_corpus(
        [root], tmp_path, tokenizer="bytes", max_bytes=5000, heldout_fraction=0.0, progress=False
    )
    assert meta["bytes"]["train"] <= 5000
    assert meta["files"]["capped"] > 0 and meta["tokens"]["heldout"] == 0
    assert len(load_split(tmp_path, "heldout")) == 0


def test_tokenizer_from_reuses_another_corpus_tokenizer(corpora, tree, tmp_path):
    root, _ = tree
    source, meta = corpora["bpe"]
    reused = build_corpus(
        [root], tmp_path, tokenizer_from=source / "tokenizer", heldout_fraction=0.25, progress=False
    )
    # Same files, same split, same tokenizer: the same token ids (no BPE was trained here).
    assert np.array_equal(load_split(tmp_path, "train"), load_split(source, "train"))
    assert reused["vocab_size"] == meta["vocab_size"] and reused["tokenizer"].startswith("from ")
    with pytest.raises(ValueError, match="tokenizer_from=.*tokenizer.json"):
        build_corpus([root], tmp_path / "out", tokenizer_from=tmp_path / "nowhere", progress=False)


def test_errors(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match="does not exist"):
        build_corpus([tmp_path / "missing"], tmp_path / "out", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="no text files"):
        build_corpus([empty], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        build_corpus([root], tmp_path / "out", tokenizer="wordpiece", progress=False)
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="heldout_fraction"):
            build_corpus([root], tmp_path / "out", heldout_fraction=fraction, progress=False)
    with pytest.raises(ValueError, match="no sources"):
        build_corpus([], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="split"):
        load_split(tmp_path, "validation")


def test_measure_tokenizers(tree):
    root, _ = tree
    result = measure_tokenizers([root], sample_bytes=1 << 20, vocab_sizes=(300,), heldout_fraction=0.25)
    by_kind = {r["tokenizer"]: r for r in result["results"]}
    assert by_kind["bytes"]["bytes_per_token"] == pytest.approx(1.0)
    assert by_kind["bpe"]["bytes_per_token"] > 1.0


FILLER = "\n".join(
    f"line {i}: the quick brown fox jumps over the lazy dog, résumé {i * 7}" for i in range(400)
)
# Real-looking filler: code and English paragraphs, as decoded from train.bin (none of EVAL_PHRASES).
PROSE_AND_CODE = """def parse_header(stream):
    \"\"\"Read the header block and return a mapping of field names to values.\"\"\"
    fields = {}
    for line in stream:
        if not line.strip():
            break
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields

The harbour town woke slowly that winter. Fishermen mended their nets by the lantern light,
and the baker opened his shutters long before the first carts rolled over the cobbles.
Nobody expected the ferry to arrive early, yet there it was, gliding past the breakwater.

Configuration options are read from the environment first, then from the settings file.
A missing option falls back to its default; an invalid one raises an error at startup.
Run the test suite with coverage enabled before you open a pull request.

class RetryPolicy:
    def __init__(self, attempts=3, backoff=0.5):
        self.attempts = attempts
        self.backoff = backoff

    def delays(self):
        return [self.backoff * 2**i for i in range(self.attempts)]

Glaciers carve valleys over thousands of years, grinding rock into fine silt that rivers carry
to the sea. Explorers crossing the ice sheet measured its thickness with simple sounding gear.
"""
FILLERS = {"lines": FILLER, "prose_and_code": PROSE_AND_CODE * 8}
# The evaluation wordings that the facts kind (English questions) must avoid, checked case-insensitively.
# " is: " was on this list until the statements were composed (2026-11-24): a colon after a verb is
# ordinary English ("the pin is: 4417"), and RULER's needle ends with one, which `nano-p3c` could
# not read back (benchmarks/NOTES.md, item 53). "One of the", its needle's opening, stays out.
FACTS_FORBIDDEN = (
    *EVAL_PHRASES,
    "magic number",
    "hidden within the following text",
    "quiz",
    "provided text",
    "What are all the",
    "Write a ",
    "What am I",
)


@pytest.mark.parametrize("filler", sorted(FILLERS))
@pytest.mark.parametrize("kind", SKILL_KINDS)
def test_skill_documents(kind, filler):
    text = FILLERS[filler]
    for seed in range(20):
        document, answer = make_skill_document(kind, text, 3000, random.Random(seed))
        body, question = document.rstrip("\n").rsplit("\n", 1)
        # The answer is read back from earlier text, never given in the final question line.
        assert answer.strip() and answer in body
        assert answer.strip() not in question
        if kind == "facts":
            # An English answer prefix: the value continues the question's sentence after one space.
            assert answer == " " + answer.strip() and not document[-1].isspace()
        else:
            assert document.endswith("\n")
        assert 2500 < len(document) < 6000
        for phrase in EVAL_PHRASES:
            assert phrase not in document
        again = make_skill_document(kind, text, 3000, random.Random(seed))
        assert again == (document, answer)
    assert make_skill_document(kind, text, 3000, random.Random(0)) != make_skill_document(
        kind, text, 3000, random.Random(1)
    )


def _facts(seed: int, text: str = PROSE_AND_CODE * 8) -> tuple[str, str, dict]:
    """make_skill_document("facts", ...) with the planted facts (same rng draws)."""
    rng = random.Random(seed)
    document, answer, planted = skills._facts_document(skills._filler_lines(text, 3000, rng), rng)
    assert make_skill_document("facts", text, 3000, random.Random(seed)) == (document, answer)
    return document, answer, planted


def test_facts_quiz_planted_keys():
    counts, asked_forms, questions, statements, quiz_sizes = [], set(), set(), set(), []
    composed_forms, attributes, repetitive, intros, composed_statements = set(), set(), 0, 0, set()
    for seed in range(200):
        document, answer, planted = _facts(seed)
        body, question = document.rsplit("\n", 1)
        facts, asked = planted["facts"], planted["asked"]
        attr, value = facts[asked]
        counts.append(len(facts))
        # The quiz asks distinct keys, the target last; the earlier ones are answered in place.
        quiz = planted["quiz"]
        assert quiz[-1] == asked and len(set(quiz)) == len(quiz) and set(quiz) <= set(facts)
        quiz_sizes.append((len(quiz), len(facts)))
        spans = planted["answer_spans"]
        assert [document[a:b] for a, b in spans] == [" " + facts[k][1] for k in quiz[:-1]]
        # The question names the asked key and its attribute; the answer is that key's value.
        assert answer == " " + value
        assert asked.lower() in question.lower() and attr in question
        assert not any(k.lower() in question.lower() for k in facts if k != asked)
        # Keys never contain one another, and the value is stated once, in a sentence naming the key.
        assert not any(a != b and a.lower() in b.lower() for a in facts for b in facts)
        assert body.count(value) == 1
        stated = planted["statements"][asked]
        assert body.index(stated) < body.index(value) < body.index(stated) + len(stated)
        # Every fact is planted in one sentence naming its key, attribute and value: one of our whole
        # statements or a composed one; the question is one of ours.
        for key, (a, v) in facts.items():
            sentence = planted["statements"][key]
            assert sentence in body and f" {v}" in sentence and a in sentence
            assert key.lower() in sentence.lower()
            whole = [t for t in skills._FACT_STATEMENTS if skills._fill_fact(t, key, a, v) == sentence]
            statements.update(whole)
            if not whole:
                composed_statements.add(sentence)
        # A whole question of ours, or a composed one ending "The {attr} {prep} {key}{trail}{verb}".
        found = [t for t in skills._FACT_QUESTIONS if question == skills._fill_fact(t, asked, attr)]
        composed = [
            (prep, trail, verb)
            for prep in skills._PREFIX_PREPS
            for trail in skills._PREFIX_TRAILS
            for verb in skills._PREFIX_VERBS
            if f" {question}".endswith(f" The {attr} {prep} {asked}{trail}{verb}")
        ]
        assert len(found) + len(composed) >= 1, question
        questions.update(found)
        composed_forms.update(composed)
        attributes.add(attr)
        repetitive += planted["repetitive"]
        intros += document.split("\n", 1)[0] in skills._FACT_INTROS
        # Keys are built from the filler's own words (no pseudo-word fallback for a real filler).
        words = [w for w in re.findall(r"[a-z]+", asked.lower()) if w != "the"]
        assert words and all(w in PROSE_AND_CODE.lower() for w in words)
        if " " not in asked and "-" in asked:
            asked_forms.add("hyphen")
        elif asked.startswith("the "):
            asked_forms.add("the")
        elif re.search(r"\d", asked):
            asked_forms.add("number")
        else:
            asked_forms.add("title")
        assert re.fullmatch(r"\d{5,9}|[a-z0-9]{6,10}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", value)
        lowered = document.lower()
        for phrase in FACTS_FORBIDDEN:
            assert phrase.lower() not in lowered, phrase
    assert min(counts) == 1 and max(counts) == 8 and sum(c > 1 for c in counts) > 150
    assert 60 < sum(q == n for q, n in quiz_sizes) < 160 and any(1 < q < n for q, n in quiz_sizes)
    assert asked_forms == {"hyphen", "the", "number", "title"}
    assert len(skills._FACT_STATEMENTS) >= 8 and statements == set(skills._FACT_STATEMENTS)
    # 60% of statements are composed (each with a value of its own, so all distinct), colons included.
    assert 0.5 < len(composed_statements) / sum(counts) < 0.7
    assert any(" is: " in t for t in composed_statements) and any(" = " in t for t in composed_statements)
    assert len(skills._FACT_QUESTIONS) >= 8 and questions == set(skills._FACT_QUESTIONS)
    # The composed questions vary their preposition, pointer and verb; attributes are often new
    # phrases made from the filler's words; some haystacks repeat a few lines; some open with an intro.
    assert len(composed_forms) > 40
    assert len(attributes - set(skills._FACT_ATTRIBUTES)) > 30
    assert 25 < repetitive < 80 and 40 < intros < 110


def test_facts_fall_back_to_pseudo_words_and_are_deterministic():
    # A filler with almost no words still gives distinct keys (pseudo-words fill in).
    for seed in range(50):
        document, answer, planted = _facts(seed, "x = 1\ny = 22\n" * 200)
        assert len(set(planted["facts"])) == len(planted["facts"]) >= 1
        assert answer in document.rsplit("\n", 1)[0]
    first = [_facts(seed)[:2] for seed in range(10)]
    assert first == [_facts(seed)[:2] for seed in range(10)]
    assert len(set(first)) == 10


def test_skill_errors():
    for kind in ("needle", "fact", ""):
        with pytest.raises(ValueError, match="skill kind"):
            make_skill_document(kind, FILLER, 1000, random.Random(0))
    with pytest.raises(ValueError, match="filler"):
        make_skill_document("copy", "  \n", 1000, random.Random(0))


def test_skill_mixture(corpora):
    path, meta = corpora["bpe"]
    result = write_skill_mixture(
        path, 20000, skill_fraction=0.5, doc_tokens=(64, 512), seed=3, progress=False
    )
    ids = np.fromfile(path / "skills.bin", dtype="<u2")
    assert len(ids) == result["tokens"] >= 20000
    assert abs(result["measured_skill_fraction"] - 0.5) < 0.1
    assert sum(result["documents"].values()) > 0 and result["text_slices"] > 0
    # Default weights: every kind, facts included, equally.
    assert result["kind_weights"] == {kind: 1.0 for kind in SKILL_KINDS}
    assert set(result["documents"]) == set(SKILL_KINDS)
    tokenizer = load_tokenizer(path)
    text = tokenizer.decode(ids.tolist())
    assert any(
        marker in text for marker in ("@get ", ">>> registry[", "resolve ", "~~ replay clip", "-- from ")
    )
    again = write_skill_mixture(path, 20000, skill_fraction=0.5, doc_tokens=(64, 512), seed=3, progress=False)
    assert again == result and np.array_equal(np.fromfile(path / "skills.bin", dtype="<u2"), ids)


def test_skill_mixture_shards_do_not_depend_on_workers(corpora, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["bpe"][0], corpus)
    kwargs = dict(skill_fraction=0.6, doc_tokens=(64, 512), seed=5, progress=False, shard_tokens=3000)

    def written(workers: int) -> tuple[dict, np.ndarray, np.ndarray]:
        result = write_skill_mixture(corpus, 10000, workers=workers, **kwargs)
        ids = np.fromfile(corpus / "skills.bin", dtype="<u2")
        return result, ids, np.fromfile(corpus / "skills_answers.bin", dtype=np.uint8)

    result, ids, answers = written(1)
    assert result["shards"] == 4 and len(ids) == len(answers) == result["tokens"] >= 10000
    assert int(answers.sum()) == result["answer_tokens"] > 0
    again = written(2)
    assert again[0] == result and np.array_equal(again[1], ids) and np.array_equal(again[2], answers)
    assert sorted(p.name for p in corpus.iterdir() if ".part" in p.name) == []
    with pytest.raises(ValueError, match="workers"):
        write_skill_mixture(corpus, 100, workers=0, progress=False)
    with pytest.raises(ValueError, match="shard_tokens"):
        write_skill_mixture(corpus, 100, shard_tokens=0, progress=False)


def test_prose_line_keeps_sentences_and_drops_code():
    assert skills.prose_line("    # Split the file content into smaller chunks, one per page.") == (
        "Split the file content into smaller chunks, one per page."
    )
    for code in ("x = foo(bar, baz) + 1  # add one", "| a | b | c | d | e | f |", "Too short to count.", ""):
        assert skills.prose_line(code) is None


def test_prose_haystack_keeps_only_prose_lines(monkeypatch):
    window = "\n".join(
        ["    # Read the file content from a path, a bytes array or a stream.", "x = load(path)"] * 40
    )
    monkeypatch.setattr(skills, "_filler_from", lambda *args: window)
    text = skills._prose_from(None, None, 0, 200, random.Random(0))
    paragraphs = text.split("\n")
    assert len(paragraphs) > 1 and len(text) >= 800
    for paragraph in paragraphs:
        assert "load(" not in paragraph and "#" not in paragraph
        assert paragraph.startswith("Read the file content")


def test_prose_haystacks_fall_back_without_prose(corpora, tmp_path):
    # The fixture corpus is word salad with braces and non-ASCII words: no prose line in it, so every
    # prose haystack falls back to plain filler instead of searching forever.
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["bpe"][0], corpus)
    kwargs = dict(skill_fraction=1.0, kind_weights={"facts": 1.0}, doc_tokens=(64, 256), progress=False)
    result = write_skill_mixture(corpus, 3000, prose_share=1.0, **kwargs)
    assert result["prose_share"] == 1.0 and result["documents"]["facts"] > 0
    with pytest.raises(ValueError, match="prose_share"):
        write_skill_mixture(corpus, 100, prose_share=1.5, **kwargs)


def test_skill_mixture_of_facts_only(corpora, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["bpe"][0], corpus)
    result = write_skill_mixture(
        corpus, 5000, skill_fraction=1.0, kind_weights={"facts": 1.0}, doc_tokens=(64, 512), progress=False
    )
    assert result["documents"]["facts"] > 0
    assert sum(result["documents"].values()) == result["documents"]["facts"]
    ids = np.fromfile(corpus / "skills.bin", dtype="<u2")
    tokenizer = load_tokenizer(corpus)
    assert int((ids == tokenizer.convert_tokens_to_ids(EOS)).sum()) == result["documents"]["facts"]
    # The answer mask: one entry per token; each marked run is a quiz answer (a value stated earlier
    # in its document), and every document's last token before <|eos|> is one.
    answers = np.fromfile(corpus / "skills_answers.bin", dtype=np.uint8)
    assert len(answers) == len(ids) and int(answers.sum()) == result["answer_tokens"] > 0
    eos = tokenizer.convert_tokens_to_ids(EOS)
    runs = 0
    for doc_ids, doc_mask in zip(
        np.split(ids, np.flatnonzero(ids == eos) + 1), np.split(answers, np.flatnonzero(ids == eos) + 1)
    ):
        if len(doc_ids) == 0:
            continue
        assert doc_ids[-1] == eos and doc_mask[-1] == 0 and doc_mask[-2] == 1
        edges = np.flatnonzero(np.diff(np.concatenate([[0], doc_mask, [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            value = tokenizer.decode(doc_ids[start:end].tolist())
            assert value.startswith(" ") and value.strip() in tokenizer.decode(doc_ids[:start].tolist())
            runs += 1
    assert runs > result["documents"]["facts"]  # some documents ask more than one question
    with pytest.raises(ValueError, match="skill kind"):
        write_skill_mixture(corpus, 100, kind_weights={"facts": 1.0, "needle": 1.0}, progress=False)


def test_skill_documents_are_sized_by_their_filler(corpora, tmp_path):
    # The corpus-wide bytes per token says nothing about one window of filler (non-ASCII text, data
    # files); sizing by it once made documents several times too long, repeating the filler. The
    # documents must not depend on that average at all.
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["bpe"][0], corpus)

    def facts_mixture() -> np.ndarray:
        facts = {"facts": 1.0}
        write_skill_mixture(
            corpus, 4000, skill_fraction=1.0, kind_weights=facts, doc_tokens=(256, 256), progress=False
        )
        return np.fromfile(corpus / "skills.bin", dtype="<u2")

    before = facts_mixture()
    meta = json.loads((corpus / "meta.json").read_text())
    meta["bytes_per_token"] *= 10
    (corpus / "meta.json").write_text(json.dumps(meta))
    assert np.array_equal(facts_mixture(), before)
