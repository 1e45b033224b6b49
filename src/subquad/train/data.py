"""Corpus building: local source/text files -> deduplicated, split, tokenized, memory-mapped token ids.

A corpus directory holds::

    tokenizer/      a transformers tokenizer (``AutoTokenizer.from_pretrained`` loads it)
    train.bin       token ids of the training files, each document followed by <|eos|>
    heldout.bin     the same for the held-out files
    meta.json       vocab size, dtype, token/byte/file counts, sources, seed

Usage::

    from subquad.train import build_corpus, load_split, load_tokenizer
    meta = build_corpus(["/usr/lib/python3/site-packages"], "corpus/", vocab_size=8192)
    ids = load_split("corpus/", "train")          # np.memmap, read-only
    tokenizer = load_tokenizer("corpus/")

The ``.bin`` files are flat little-endian arrays (``uint16`` when the vocabulary fits, else
``uint32``), the nanoGPT layout: any reader can ``np.memmap`` them without this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
TOKENIZERS: tuple[str, ...] = ("bpe", "bytes")
SPLITS: tuple[str, ...] = ("train", "heldout")
# Optional token file beside the splits (written by skills.write_skill_mixture).
SKILLS_SPLIT = "skills"

TEXT_EXTENSIONS: frozenset[str] = frozenset(
    ".py .pyi .pyx .pxd .md .txt .rst .c .h .cc .cpp .cxx .hpp .cu .cuh .js .mjs .ts .tsx .jsx .json "
    ".toml .yaml .yml .cfg .ini .sh .bash .html .css .xml .java .go .rs .rb .pl .lua .r .sql .tex "
    ".f90 .f .s .cmake .proto .csv .in .mk".split()
)
# Extension-less files that are text by convention.
TEXT_NAMES: frozenset[str] = frozenset(
    "README LICENSE COPYING NOTICE AUTHORS CHANGELOG Makefile METADATA RECORD WHEEL".split()
)
SKIP_DIRS: frozenset[str] = frozenset({"__pycache__", "node_modules"})
MAX_FILE_BYTES = 1 << 20
# Documents encoded per encode_batch call: big enough to use every core, small enough to stream.
_ENCODE_BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    digest: str


def _is_text_name(path: Path) -> bool:
    return path.suffix.lower() in TEXT_EXTENSIONS or path.name in TEXT_NAMES


def _walk(source: Path) -> Iterator[Path]:
    if source.is_file():
        yield source
        return
    # Sorted walk so that the same tree always yields the same order (and so the same corpus).
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary, other encodings)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    # A NUL byte is the cheap, reliable sign of a binary file.
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _split_of(digest: str, seed: int, heldout_fraction: float) -> str:
    # Hash of (seed, content): the same file lands in the same split wherever it lives, and a
    # duplicate can never sit in both splits.
    value = int.from_bytes(hashlib.blake2b(f"{seed}:{digest}".encode(), digest_size=8).digest(), "little")
    return "heldout" if value / 2**64 < heldout_fraction else "train"


def _check_sources(sources: Iterable[str | Path]) -> list[Path]:
    paths = [Path(s).expanduser() for s in sources]
    if not paths:
        raise ValueError("no sources given: pass at least one directory or file")
    for path in paths:
        if not path.exists():
            raise ValueError(f"source {str(path)!r} does not exist")
    return paths


def collect_files(
    sources: Iterable[str | Path], max_bytes: int | None = None, seed: int = 0, progress: bool = False
) -> tuple[list[_File], dict[str, int]]:
    """Walk ``sources`` and return the unique text files (in a seeded order) and counts of what was skipped.

    Files are kept when their extension/name marks them as text, they are at most 1 MB, they decode
    as UTF-8 without NUL bytes, and no earlier file had the same content. ``max_bytes`` keeps a
    seeded random subset of files whose sizes sum to at most that many bytes, so a cap samples the
    whole tree rather than its alphabetically first packages.
    """
    counts = dict(
        seen=0,
        kept=0,
        duplicates=0,
        skipped_extension=0,
        skipped_large=0,
        skipped_binary=0,
        skipped_empty=0,
        capped=0,
    )
    seen_digests: set[str] = set()
    files: list[_File] = []
    walk = (p for source in _check_sources(sources) for p in _walk(source))
    for path in tqdm(walk, desc="scanning", unit=" files", disable=not progress):
        counts["seen"] += 1
        if not _is_text_name(path):
            counts["skipped_extension"] += 1
            continue
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        if size > MAX_FILE_BYTES:
            counts["skipped_large"] += 1
            continue
        if size == 0:
            counts["skipped_empty"] += 1
            continue
        text = _read_text(path)
        if text is None:
            counts["skipped_binary"] += 1
            continue
        if not text.strip():
            counts["skipped_empty"] += 1
            continue
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_digests:
            counts["duplicates"] += 1
            continue
        seen_digests.add(digest)
        files.append(_File(path, len(data), digest))
    random.Random(seed).shuffle(files)
    if max_bytes is not None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        kept, total = [], 0
        for f in files:
            if total + f.size <= max_bytes:
                kept.append(f)
                total += f.size
        counts["capped"] = len(files) - len(kept)
        files = kept
    counts["kept"] = len(files)
    if not files:
        raise ValueError(f"no text files found in {[str(s) for s in sources]} (after skipping and capping)")
    return files, counts


def _iter_texts(files: Iterable[_File], byte_budget: int | None = None) -> Iterator[str]:
    used = 0
    for f in files:
        if byte_budget is not None and used >= byte_budget:
            return
        text = _read_text(f.path)
        if text is not None:
            used += f.size
            yield text


def train_tokenizer(
    kind: str, texts: Iterable[str] = (), vocab_size: int = 8192, show_progress: bool = False
) -> Tokenizer:
    """A ``tokenizers.Tokenizer``: byte-level BPE trained on ``texts`` (``"bpe"``) or the 256 bytes.

    Both are byte-level: every string round-trips exactly through encode/decode. Special tokens
    are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``.
    """
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer {kind!r} is unknown; expected one of {', '.join(TOKENIZERS)}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bytes":
        # A BPE model with no merges over the byte alphabet = one token per byte, ids 0..255 by byte value.
        byte_chars = [_BYTE_TO_CHAR[b] for b in range(256)]
        vocab = {c: i for i, c in enumerate(byte_chars)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        # No regex split: words do not matter when every byte is its own token.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for bpe, got {vocab_size}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            min_frequency=2,
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.decoder = decoders.ByteLevel()
    # For "bytes" this appends the specials after the 256 bytes; for "bpe" they already exist (ids 0-2).
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _byte_to_char() -> dict[int, str]:
    # GPT-2's printable mapping of bytes to unicode characters, which ByteLevel uses.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = _byte_to_char()


def _save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Exact round trips: never rewrite spaces around punctuation on decode.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    fast.save_pretrained(str(directory))


def _load_tokenizer_file(directory: str | Path) -> Tokenizer:
    """``directory/tokenizer.json``, checked to hold the corpus special tokens."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer_from={str(directory)!r}: expected a directory with a tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    missing = [name for name in SPECIAL_TOKENS if tok.token_to_id(name) is None]
    if missing:
        raise ValueError(f"tokenizer_from={str(directory)!r}: the tokenizer lacks special tokens {missing}")
    return tok


def load_tokenizer(corpus_dir: str | Path):
    """The corpus's tokenizer as a transformers tokenizer (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    path = Path(corpus_dir) / "tokenizer"
    if not path.is_dir():
        raise ValueError(f"{str(corpus_dir)!r} has no tokenizer/ directory; build it with build_corpus")
    return AutoTokenizer.from_pretrained(str(path))


def load_meta(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "meta.json"
    if not path.is_file():
        raise ValueError(f"{str(corpus_dir)!r} has no meta.json; build it with build_corpus")
    return json.loads(path.read_text())


def load_split(corpus_dir: str | Path, split: str) -> np.ndarray:
    """The token ids of ``split`` (``"train"``, ``"heldout"`` or ``"skills"``) as a read-only ``np.memmap``.

    An empty split (``heldout_fraction=0``) comes back as an empty array: numpy cannot map 0 bytes.
    """
    if split not in (*SPLITS, SKILLS_SPLIT):
        raise ValueError(f"split {split!r} is unknown; expected one of {', '.join((*SPLITS, SKILLS_SPLIT))}")
    meta = load_meta(corpus_dir)
    path = Path(corpus_dir) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.dtype(meta["dtype"]))
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def _encode_to(
    tokenizer: Tokenizer, files: list[_File], out_path: Path, dtype: np.dtype, progress: bool, desc: str
) -> tuple[int, int]:
    """Encode ``files`` in batches and append their ids (+ eos) to ``out_path``; returns (tokens, bytes)."""
    eos = tokenizer.token_to_id(EOS)
    # A literal "<|eos|>" in a source file is text, not a document boundary.
    tokenizer.encode_special_tokens = True
    tokens = nbytes = 0
    with (
        open(out_path, "wb") as out,
        tqdm(
            total=sum(f.size for f in files), desc=desc, unit="B", unit_scale=True, disable=not progress
        ) as bar,
    ):
        batch: list[str] = []
        batch_bytes = 0

        def flush() -> None:
            nonlocal tokens, batch_bytes
            if not batch:
                return
            encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
            ids = np.concatenate([np.append(np.asarray(e.ids, dtype=np.int64), eos) for e in encodings])
            ids.astype(dtype).tofile(out)
            tokens += len(ids)
            bar.update(batch_bytes)
            batch.clear()
            batch_bytes = 0

        for text in _iter_texts(files):
            size = len(text.encode("utf-8"))
            batch.append(text)
            batch_bytes += size
            nbytes += size
            if batch_bytes >= _ENCODE_BATCH_BYTES:
                flush()
        flush()
    return tokens, nbytes


def _check_fraction(name: str, value: float, allow_zero: bool = True) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and low_ok and value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def build_corpus(
    sources: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    heldout_fraction: float = 0.01,
    max_bytes: int | None = None,
    seed: int = 0,
    progress: bool = True,
    tokenizer_train_bytes: int | None = 200_000_000,
    tokenizer_from: str | Path | None = None,
) -> dict:
    """Build a tokenized corpus in ``out_dir`` from the text files under ``sources``; returns meta.json.

    ``tokenizer``: ``"bpe"`` (byte-level BPE of ``vocab_size`` tokens trained on the training split,
    at most ``tokenizer_train_bytes`` of it) or ``"bytes"`` (256 bytes + 3 specials; ``vocab_size`` is
    ignored). ``tokenizer_from``: a directory holding a ``tokenizer.json`` (a model's, or another
    corpus's ``tokenizer/``) to reuse instead of training one, so that a model trained on another
    corpus keeps its token ids (``tokenizer`` and ``vocab_size`` are then ignored). Held-out files
    are chosen by a seeded hash of their content, so the split is by file
    and the same on every rerun. Rerunning overwrites the directory's corpus files.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer {tokenizer!r} is unknown; expected one of {', '.join(TOKENIZERS)}")
    reused = None if tokenizer_from is None else _load_tokenizer_file(tokenizer_from)
    _check_fraction("heldout_fraction", heldout_fraction)
    source_paths = _check_sources(sources)
    files, counts = collect_files(source_paths, max_bytes=max_bytes, seed=seed, progress=progress)
    split_files = {s: [f for f in files if _split_of(f.digest, seed, heldout_fraction) == s] for s in SPLITS}
    if not split_files["train"]:
        raise ValueError("every file fell in the held-out split; lower heldout_fraction or add files")
    counts.update({s: len(fs) for s, fs in split_files.items()})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = reused or train_tokenizer(
        tokenizer,
        _iter_texts(split_files["train"], tokenizer_train_bytes),
        vocab_size=vocab_size,
        show_progress=progress,
    )
    _save_tokenizer(tok, out / "tokenizer")
    actual_vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = _dtype_for(actual_vocab)

    tokens, nbytes = {}, {}
    for split in SPLITS:
        tokens[split], nbytes[split] = _encode_to(
            tok, split_files[split], out / f"{split}.bin", dtype, progress, f"encoding {split}"
        )
    meta = {
        "vocab_size": actual_vocab,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "tokenizer": tokenizer if reused is None else f"from {Path(tokenizer_from).resolve()}",
        "special_tokens": {name: tok.token_to_id(name) for name in SPECIAL_TOKENS},
        "tokens": tokens,
        "files": counts,
        "bytes": nbytes,
        # Over both splits, eos tokens included: converts a per-token loss on these streams to bits/byte.
        "bytes_per_token": sum(nbytes.values()) / max(1, sum(tokens.values())),
        "sources": [str(p.resolve()) for p in source_paths],
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "max_bytes": max_bytes,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def measure_tokenizers(
    sources: list[str | Path],
    sample_bytes: int = 50_000_000,
    vocab_sizes: Iterable[int] = (4096, 8192, 16384, 32768),
    heldout_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train each tokenizer on a seeded sample of ``sources`` and report bytes per token on held-out files.

    Returns ``{"sample_bytes", "files", "heldout_bytes", "results": [{"tokenizer", "vocab_size",
    "bytes_per_token", "heldout_tokens"}, ...]}``; more bytes per token = shorter sequences for the
    same text, i.e. more text inside a fixed context and fewer forward passes per byte.
    """
    _check_fraction("heldout_fraction", heldout_fraction, allow_zero=False)
    files, counts = collect_files(sources, max_bytes=sample_bytes, seed=seed, progress=progress)
    train = [f for f in files if _split_of(f.digest, seed, heldout_fraction) == "train"]
    heldout = [f for f in files if _split_of(f.digest, seed, heldout_fraction) == "heldout"]
    if not heldout or not train:
        raise ValueError("the sample is too small to hold out files; raise sample_bytes or heldout_fraction")
    heldout_texts = list(_iter_texts(heldout))
    heldout_bytes = sum(len(t.encode("utf-8")) for t in heldout_texts)
    results = []
    for kind, vocab in [("bytes", 256 + len(SPECIAL_TOKENS))] + [("bpe", v) for v in vocab_sizes]:
        tok = train_tokenizer(kind, _iter_texts(train), vocab_size=vocab, show_progress=progress)
        tok.encode_special_tokens = True
        n = sum(len(e.ids) for e in tok.encode_batch(heldout_texts, add_special_tokens=False))
        results.append(
            {
                "tokenizer": kind,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "bytes_per_token": heldout_bytes / n,
                "heldout_tokens": n,
            }
        )
    return {
        "sources": [str(s) for s in sources],
        "sample_bytes": sum(f.size for f in files),
        "files": {"train": len(train), "heldout": len(heldout), **counts},
        "heldout_bytes": heldout_bytes,
        "results": results,
    }
