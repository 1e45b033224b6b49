"""A long RULER single-needle sample's needle (same key, value and depth) in shorter haystacks, on the CPU.

    PYTHONPATH=src python3 benchmarks/results/float64-needles-2026-11-25/shrink.py --indices 37 \
        --sizes 5,10,30,100,500,1000 [--task niah_single_1 --length 1m]

``--sizes`` are the task's haystack units (noise lines for ``niah_single_1``, ~33 tokens each; essay
words for ``niah_single_2``, ~1.6 tokens each). One JSON line per size: does the shipped nano find it?
"""

import argparse
import itertools
import json
import time

import torch

from subquad.benchmark import parse_length
from subquad.eval import ruler
from subquad.eval._core import encode, postprocess_prediction, sample_rng
from subquad.eval.runner import load_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument(
    "--indices", required=True, help="the samples' indices in their cell (seed 0): 37 or 0-49"
)
parser.add_argument("--sizes", required=True, help="haystack sizes, comma-separated")
parser.add_argument("--task", default="niah_single_1")
parser.add_argument("--length", default="1m", help="the cell the sample comes from")
parser.add_argument(
    "--max-new-tokens", type=int, default=16, help="16 reads a number; the evaluation's 32 for a UUID"
)
args = parser.parse_args()

model, tok = load_model("src/subquad/assets/subquad-nano", device="cpu")
model.eval()
length = parse_length(args.length)
first, _, last = args.indices.partition("-")
for index, size in itertools.product(
    range(int(first), int(last or first) + 1), map(int, args.sizes.split(","))
):
    build, _ = ruler._builder(args.task, sample_rng("ruler", args.task, length, 0, index), length, tok)
    built = build(size)
    ids = torch.tensor([encode(tok, built.text)])
    start = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    prediction = tok.decode(out[0, ids.shape[1] :])
    row = {
        "task": args.task,
        "length": args.length,
        "index": index,
        "size": size,
        "tokens": ids.shape[1],
        "depths": built.meta["depths"],
        "answer": built.answers[0],
        "found": ruler.score(args.task, postprocess_prediction(prediction), built.answers) == 1.0,
        "prediction": prediction[:60],
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(row), flush=True)
