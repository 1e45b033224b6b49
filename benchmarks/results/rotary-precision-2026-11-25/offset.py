"""How far a local_rope model's rotary tables drift at large positions, simulated at short lengths.

The shipped nano (``position_scheme="local_rope"``) rotates only its local window; routed and sink scores
are position-free. So the same prompt with every position shifted by a constant ``OFFSET`` has exactly
the same outputs in exact arithmetic: only the float precision of ``position * inv_freq`` differs. This
runs RULER prompts at ``--length`` with positions starting at 0 and at ``--offset`` (default 12M - length:
the positions of a 12M prompt's last tokens), and reports the last position's logit difference and the
greedy answers' score. CPU.

    PYTHONPATH=src python3 benchmarks/results/rotary-precision-2026-11-25/offset.py --samples 20
"""

import argparse
import json
import time

import torch

from subquad.benchmark import parse_length
from subquad.eval import ruler
from subquad.eval._core import encode, postprocess_prediction
from subquad.eval.runner import _greedy_generate, load_model
from subquad.models.subquad import modeling

SHIPPED = "src/subquad/assets/subquad-nano"


def shifted(offset: int):
    """``SubquadRotary.tables`` with every position moved by ``offset``."""
    original = modeling.SubquadRotary.tables

    def tables(self, positions):
        return original(self, positions + offset)

    return original, tables


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--length", default="4k")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--offset", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    length = parse_length(args.length)
    offset = args.offset if args.offset is not None else 12 * 2**20 - length
    model, tokenizer = load_model(SHIPPED, device="cpu")
    original, moved = shifted(offset)
    rows = []
    for sample in ruler.iter_samples(args.task, length, tokenizer, 0, stop=args.samples):
        ids = encode(tokenizer, sample.input)
        x = torch.tensor([ids])
        row = {"index": sample.index, "tokens": len(ids)}
        logits = {}
        for name, tables in (("base", original), ("offset", moved)):
            modeling.SubquadRotary.tables = tables
            start = time.perf_counter()
            with torch.inference_mode():
                logits[name] = model(x).logits[0, -1].float()
            text = _greedy_generate(model, tokenizer, [ids], 12)[0]
            row[f"{name}_found"] = ruler.score(args.task, postprocess_prediction(text), sample.answers) == 1.0
            row[f"{name}_answer"] = postprocess_prediction(text)[:24]
            row[f"{name}_s"] = round(time.perf_counter() - start, 1)
        modeling.SubquadRotary.tables = original
        row["max_logit_diff"] = round(float((logits["base"] - logits["offset"]).abs().max()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "task": args.task,
        "length": length,
        "offset": offset,
        "samples": len(rows),
        "found_base": sum(r["base_found"] for r in rows),
        "found_offset": sum(r["offset_found"] for r in rows),
        "median_max_logit_diff": sorted(r["max_logit_diff"] for r in rows)[len(rows) // 2],
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as sink:
            for r in rows + [summary]:
                sink.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
