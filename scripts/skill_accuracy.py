"""Can the model do what its skill documents teach? Greedy answers on fresh documents of our own format.

The RULER needles ask in the evaluation's wording; this asks in the training data's (``subquad.train
.skills``), with filler from the corpus's *held-out* split, so the documents are new to the model.
When a model fails the needles, this separates "has not learned to read back at all" (fails here
too) from "does not generalise to the evaluation's phrasing" (passes here). An answer counts when
the generated text starts with the expected one (leading spaces ignored). A length is the
filler's token count; the planted facts and the quiz come on top, so every row records its
prompt's token count.

``--routing`` also prefills each prompt once more and records, per layer, where the router ranks
the block holding the asked fact for the last token and whether it is attended
(``scripts/needle_routing.py``'s ``block_ranks``): a miss then shows whether the router or the
read-back failed.

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
from needle_routing import block_ranks  # scripts/ is on sys.path when this runs as a script
from tokenizers import Tokenizer

from subquad.eval._core import parse_lengths
from subquad.eval.runner import load_model
from subquad.train.data import EOS, load_split
from subquad.train.skills import SKILL_KINDS, _filler_from, make_skill_document


def skill_accuracy(
    model, tokenizer, corpus: Path, kind: str, length: int, samples: int, seed: int, routing: bool = False
) -> dict:
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
        row = {"tokens": ids.shape[1], "answer": answer, "output": got,
               "correct": got.lstrip().startswith(answer.strip())}  # fmt: skip
        if routing:
            # The asked value occurs once before the question: in the sentence that states it.
            fact_token = len(tokenizer(document[: document.index(answer.strip())]).input_ids)
            ranks = block_ranks(model, ids, fact_token)
            row["fact_token"] = fact_token
            row["layers"] = ranks["layers"]
            row["attended_layers"] = sum(layer["selected"] for layer in ranks["layers"])
        rows.append(row)
    result = {"kind": kind, "length": length, "samples": samples,
              "accuracy": sum(r["correct"] for r in rows) / samples, "rows": rows}  # fmt: skip
    if routing:
        # Share of samples whose fact block is attended in at least one layer, by correctness.
        for name, wanted in (("attended_when_correct", True), ("attended_when_wrong", False)):
            group = [r for r in rows if r["correct"] == wanted]
            result[name] = sum(r["attended_layers"] > 0 for r in group) / len(group) if group else None
    return result


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
    parser.add_argument("--routing", action="store_true", help="also record where the router ranks the fact")
    args = parser.parse_args()
    if args.samples < 1:
        raise SystemExit(f"--samples {args.samples}: expected at least 1")
    corpus = Path(args.corpus)
    if not (corpus / "heldout.bin").is_file():
        raise SystemExit(f"--corpus {args.corpus!r}: no heldout.bin (expected a `subquad corpus` directory)")
    model, tokenizer = load_model(args.model, device=args.device)
    if args.routing and getattr(model.config, "attention", None) != "ssa":
        raise SystemExit(f"--routing: {args.model!r} is not an SSA model, it has no router to inspect")
    results = []
    for length in parse_lengths(args.lengths):
        start = time.perf_counter()
        result = skill_accuracy(
            model, tokenizer, corpus, args.kind, length, args.samples, args.seed, args.routing
        )
        results.append(result)
        tokens = sorted(row["tokens"] for row in result["rows"])
        print(f"{args.kind} at {length}: {result['accuracy']:.0%} of {args.samples} "
              f"(median prompt {tokens[len(tokens) // 2]} tokens, {time.perf_counter() - start:.1f} s)",
              flush=True)  # fmt: skip
        if args.routing:
            print(f"  fact block attended in some layer: {result['attended_when_correct']} of the correct, "
                  f"{result['attended_when_wrong']} of the wrong", flush=True)  # fmt: skip
        if args.out:  # after every length, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(
                    {"model": args.model, "corpus": args.corpus, "seed": args.seed, "results": results},
                    f,
                    indent=2,
                )


if __name__ == "__main__":
    main()
