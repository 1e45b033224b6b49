"""Corpus building, tokenizers and skill documents, on a small generated tree (CPU, seconds)."""

from __future__ import annotations

import json
import random
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


@pytest.mark.parametrize("kind", SKILL_KINDS)
def test_skill_documents(kind):
    for seed in range(20):
        document, answer = make_skill_document(kind, FILLER, 3000, random.Random(seed))
        assert answer and answer in document
        # The answer is read back from earlier text, never given in the final question line.
        assert answer not in document.rstrip("\n").rsplit("\n", 1)[-1]
        assert document.endswith("\n")
        assert 2500 < len(document) < 6000
        for phrase in EVAL_PHRASES:
            assert phrase not in document
        again = make_skill_document(kind, FILLER, 3000, random.Random(seed))
        assert again == (document, answer)
    assert make_skill_document(kind, FILLER, 3000, random.Random(0)) != make_skill_document(
        kind, FILLER, 3000, random.Random(1)
    )


def test_skill_errors():
    with pytest.raises(ValueError, match="skill kind"):
        make_skill_document("needle", FILLER, 1000, random.Random(0))
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
    assert json.loads((path / "skills.json").read_text()) == json.loads(json.dumps(result))
    tokenizer = load_tokenizer(path)
    text = tokenizer.decode(ids.tolist())
    assert any(
        marker in text for marker in ("@get ", ">>> registry[", "resolve ", "~~ replay clip", "-- from ")
    )
    again = write_skill_mixture(path, 20000, skill_fraction=0.5, doc_tokens=(64, 512), seed=3, progress=False)
    assert again == result and np.array_equal(np.fromfile(path / "skills.bin", dtype="<u2"), ids)
