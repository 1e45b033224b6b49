"""A replayed decode step of `small` (SSA, tree index) at 1M keys, as `step_time.py` of
decode-step-folds-h200-2026-11-24 (median of 40 steps after a crop, which re-captures), with `--repeats`
re-captures in a row, per capture: does the step's time depend on what came before? `--mode`: `crop` (the
default: a crop, which clears the kept bounds, then a re-capture), `fresh` (as crop, but the old graph is
dropped and the allocator's cache emptied first, so every capture starts a new pool), `invalidate` (a
re-capture without a crop: the windows move on), `keep` (as crop, every old graph kept alive), `none`
(no re-capture: 40-step windows one after the other). `--dummy-graphs N` first captures, replays and
drops N one-kernel graphs of its own, before the decoder exists; `--no-pdl` launches without programmatic
dependent launch. Run from the repo root:
`PYTHONPATH=src python <this file> [--mode MODE]`."""

import argparse
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import pdl

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--repeats", type=int, default=10)
parser.add_argument("--mode", default="crop", choices=["crop", "fresh", "invalidate", "keep", "none"])
parser.add_argument("--dummy-graphs", type=int, default=0)
parser.add_argument("--no-pdl", action="store_true")
args = parser.parse_args()
pdl.ENABLED = not args.no_pdl

x = torch.ones(1024, device="cuda")
for _ in range(args.dummy_graphs):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
    graph.replay()
    del graph

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": "tree"})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 1024)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda", generator=gen)
base = args.length + 65
with torch.no_grad():
    for _ in range(70):
        decoder.step(token)
    walls, kept = [], []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        if args.mode == "fresh":
            decoder._pieces = []  # the old graph and its pool go; the next capture starts a new pool
            torch.cuda.empty_cache()
        if args.mode == "keep":
            kept.append(decoder._pieces)
        if args.mode in ("crop", "fresh", "keep"):
            cache.crop(base - cache.get_seq_length())
        if args.mode == "invalidate":
            decoder.invalidate()
        decoder.step(token)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / 40 * 1e3)
    label = f"{args.mode}, pdl {pdl.ENABLED}, dummy graphs {args.dummy_graphs}, captures {decoder.captures}"
    print(f"{label}: " + " ".join(f"{w:.4f}" for w in walls), flush=True)
