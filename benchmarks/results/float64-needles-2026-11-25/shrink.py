"""A 1M ``niah_single_1`` sample's needle (same key, value and depth) in shorter noise haystacks, on the CPU.

    PYTHONPATH=src python3 benchmarks/results/float64-needles-2026-11-25/shrink.py INDEX LINES,LINES,...

One JSON line per haystack size (noise lines; ~33 tokens a line): does the shipped nano find it?
"""

import json
import sys
import time

import torch

from subquad.eval import ruler
from subquad.eval._core import sample_rng
from subquad.eval.runner import load_model

model, tok = load_model("src/subquad/assets/subquad-nano", device="cpu")
model.eval()
index = int(sys.argv[1]) if len(sys.argv) > 1 else 37
for lines in map(int, sys.argv[2].split(",")):
    rng = sample_rng("ruler", "niah_single_1", 1048576, 0, index)
    build, _ = ruler._builder("niah_single_1", rng, 1048576, tok)
    built = build(lines)
    ids = torch.tensor([tok(built.text)["input_ids"]])
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    pred = tok.decode(out[0, ids.shape[1] :])
    print(
        json.dumps(
            {
                "index": index,
                "lines": lines,
                "tokens": ids.shape[1],
                "depths": built.meta["depths"],
                "answer": built.answers[0],
                "found": built.answers[0] in pred,
                "prediction": pred[:40],
                "s": round(time.time() - t0, 1),
            }
        ),
        flush=True,
    )
