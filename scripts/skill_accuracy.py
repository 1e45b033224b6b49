"""Can the model do what its skill documents teach? Greedy answers on fresh documents of our own format.

The RULER needles ask in the evaluation's wording; this asks in the training data's (``subquad.train
.skills``), with filler from the corpus's *held-out* split, so the documents are new to the model.
When a model fails the needles, this separates "has not learned to read back at all" (fails here
too) from "does not generalise to the evaluation's phrasing" (passes here). An answer counts when
the generated text starts with the expected one (leading spaces ignored). A length is the
filler's token count; the planted facts and the quiz come on top, so every row records its
prompt's token count.

    PYTHONPATH=src python scripts/skill_accuracy.py --model DIR --corpus runs/corpus-ft \
        --kind facts --lengths 2k,8k,32k --samples 50 --device cuda --out skills.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from subquad.eval._core import parse_lengths
from subquad.eval.runner import load_model
from subquad.train.data import EOS, load_split
from subquad.train.skills import SKILL_KINDS, _filler_from, make_skill_document


def skill_accuracy(model, tokenizer, corpus: Path, kind: str, length: int, samples: int, seed: int) -> dict:
    heldout = load_split(corpus, "heldout")
    raw = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    eos = raw.token_to_id(EOS)
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        filler = _filler_from(heldout, raw, eos, length, rng)
        document, answer = make_skill_document(kind, filler, len(filler), rng)  # as in training
        ids = tokenizer(document, return_tensors="pt").input_ids.to(model.device)
        wanted = len(tokenizer(answer).input_ids)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=wanted + 2, do_sample=False)
        got = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append({"tokens": ids.shape[1], "answer": answer, "output": got,
                     "correct": got.lstrip().startswith(answer.strip())})  # fmt: skip
    return {"kind": kind, "length": length, "samples": samples,
            "accuracy": sum(r["correct"] for r in rows) / samples, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True, help="corpus directory with heldout.bin and its tokenizer")
    parser.add_argument("--kind", default="facts", choices=SKILL_KINDS)
    parser.add_argument("--lengths", default="2k")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.samples < 1:
        raise SystemExit(f"--samples {args.samples}: expected at least 1")
    corpus = Path(args.corpus)
    if not (corpus / "heldout.bin").is_file():
        raise SystemExit(f"--corpus {args.corpus!r}: no heldout.bin (expected a `subquad corpus` directory)")
    model, tokenizer = load_model(args.model, device=args.device)
    results = []
    for length in parse_lengths(args.lengths):
        start = time.perf_counter()
        result = skill_accuracy(model, tokenizer, corpus, args.kind, length, args.samples, args.seed)
        results.append(result)
        tokens = sorted(row["tokens"] for row in result["rows"])
        print(f"{args.kind} at {length}: {result['accuracy']:.0%} of {args.samples} "
              f"(median prompt {tokens[len(tokens) // 2]} tokens, {time.perf_counter() - start:.1f} s)",
              flush=True)  # fmt: skip
        if args.out:  # after every length, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(
                    {"model": args.model, "corpus": args.corpus, "seed": args.seed, "results": results},
                    f,
                    indent=2,
                )


if __name__ == "__main__":
    main()
