"""Are the graphed step's logits the same, bit for bit, whichever kernels let the next one launch before
their wait (`subquad.ops.pdl.EARLY`)? `small` (SSA, tree index) at `--length` tokens: for each set (as in
`step_early.py`), capture the step anew, then `--repeats` times rewind to one position and step; each
logits row is compared with the first set's first one. Prints mismatches and the largest difference.
Run from the repo root: `PYTHONPATH=src python <this file> --sets 'none=' 'A=...'`."""

import argparse

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import pdl

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--index", default="tree", choices=["flat", "tree"])
parser.add_argument("--repeats", type=int, default=30)
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--sets", nargs="+", default=["none="])
args = parser.parse_args()
sets = {}
for spec in args.sets:
    name, _, kernels = spec.partition("=")
    sets[name] = frozenset(filter(None, kernels.split(",")))

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": args.index})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 512)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
base = args.length + 65
reference = None
with torch.no_grad():
    for _ in range(70):
        decoder.step(token)
    for r in range(args.rounds):
        for name, early in sets.items():
            pdl.EARLY = early
            decoder.invalidate()
            decoder.step(token)
            decoder.step(token)
            rows = []
            for _ in range(args.repeats):
                cache.crop(base - cache.get_seq_length())
                rows.append(decoder.step(token).clone())
            rows = torch.cat(rows).float()
            if reference is None:
                reference = rows[:1]
            diff = (rows - reference).abs().amax(dim=-1)
            print(
                f"round {r} {name:6s} mismatched steps {int((diff > 0).sum())} of {args.repeats}, "
                f"largest difference {float(diff.max()):.4g}",
                flush=True,
            )
