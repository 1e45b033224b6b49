"""Time ``triton_select.threshold_topk`` alone (random inputs) for one code tree and a few module
constants, and count the rows whose picks differ from a reference run.

    PYTHONPATH=<tree>/src python ab.py --name NAME --length 1m [--set triton_select.CONST=V] [--ref FILE]
        [--shape small --queries 64k] [--shape nano --sub-block 4]

The first run of a length writes ``--ref`` (each row's sorted picks, hashed); later runs compare.
"""

import argparse
import importlib
import json
import os

import torch

from subquad.benchmark import parse_length
from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import routing_queries, routing_summaries

# (Hq, Hkv, D), as in scripts/profile_select.py.
SHAPES = {"layer-8b": (32, 8, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}


def row_hashes(picks: torch.Tensor) -> torch.Tensor:
    weights = torch.arange(1, picks.shape[-1] + 1, device=picks.device, dtype=torch.int64) * 1000003
    return (picks.sort(-1).values.long() * weights).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--length", default="1m")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--ref", default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="layer-8b")
    parser.add_argument("--queries", default=None, help="route only the last this many tokens")
    parser.add_argument("--sub-block", type=int, default=None, help="summary='max' with this sub-block")
    args = parser.parse_args()
    for item in args.set:
        name, value = item.split("=")
        module, const = name.rsplit(".", 1)
        setattr(importlib.import_module(f"subquad.ops.ssa.{module}"), const, int(value))
    n = parse_length(args.length)
    queries = n if args.queries is None else parse_length(args.queries)
    heads, heads_kv, dim = SHAPES[args.shape]
    cfg = SSAConfig() if args.sub_block is None else SSAConfig(summary="max", sub_block_size=args.sub_block)
    torch.manual_seed(0)
    q = torch.randn(1, queries, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, heads_kv, dim, device="cuda", dtype=torch.bfloat16)
    rq = routing_queries(q, heads_kv).bfloat16()
    summ = routing_summaries(k, cfg).bfloat16().contiguous()
    del q, k
    offset = n - queries
    picks = triton_select.threshold_topk(rq, summ, offset, cfg, True)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        triton_select.threshold_topk(rq, summ, offset, cfg, True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    hashes = row_hashes(picks)
    differ = None
    if args.ref and os.path.exists(args.ref):
        differ = int((torch.load(args.ref) != hashes).sum())
    elif args.ref:
        torch.save(hashes, args.ref)
    times.sort()
    record = dict(name=args.name, shape=args.shape, length=args.length, queries=queries, set=args.set)
    record.update(median_ms=round(times[len(times) // 2], 2), min_ms=round(times[0], 2))
    print(json.dumps(record | {"rows_differing": differ, "rows": hashes.numel()}))


if __name__ == "__main__":
    main()
