"""The few-token flat router (NOTES item 76): ``route_flat_triton`` end to end with ``split=False`` (the
tile kernels, one program per tile of tokens and KV head walking every block) against ``split=True``
(``split_topk``: programs split the blocks, then ``torch.topk``), for the last 1, 16 and 64 tokens of
random inputs; the picks' scores are checked equal.
GPU, from the repo root: ``PYTHONPATH=src python benchmarks/results/split-route-2026-11-25/ab.py``."""

import functools

import torch
import triton

from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import routing_queries, routing_summaries

SHAPES = {"layer-8b": (32, 8, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}
LENGTHS = (1 << 15, 1 << 17, 1 << 20, 4 << 20, 12 << 20)
# shape, sub-block size (None: mean summaries), lengths
CASES = [("nano", 4, LENGTHS), ("small", None, LENGTHS), ("layer-8b", None, LENGTHS[:3])]


def bench(fn):
    return min(triton.testing.do_bench(fn, warmup=2, rep=10) for _ in range(2))


def picked_scores(rq, summ, picked, subs):
    """Sorted routing scores of the picks (ties may make ids differ, not these)."""
    scores = torch.einsum("bthd,bnhd->bhtn", rq.float(), summ.float())
    scores = scores.unflatten(-1, (-1, subs)).amax(-1)
    got = scores.gather(-1, picked.long().clamp(min=0))
    return got.masked_fill(picked < 0, float("-inf")).sort(-1).values


def run_length(shape, sub, n):
    heads, hkv, dim = SHAPES[shape]
    cfg = SSAConfig() if sub is None else SSAConfig(summary="max", sub_block_size=sub)
    torch.manual_seed(0)
    summ = routing_summaries(torch.randn(1, n, hkv, dim, device="cuda", dtype=torch.bfloat16), cfg)
    summ = summ.bfloat16().contiguous()
    for queries in (1, 16, 64):
        rq = routing_queries(torch.randn(1, queries, heads, dim, device="cuda", dtype=torch.bfloat16), hkv)
        rq = rq.bfloat16()
        row = f"{shape} sub={sub} N={n} q={queries}:"
        picks = {}
        for split in (False, True):
            route = functools.partial(triton_select.route_flat_triton, rq, summ, n, cfg, True, split=split)
            picks[split] = route()
            row += f" {'split' if split else 'tiles'} {bench(route):.3f} ms"
        subs = cfg.summaries_per_block
        same = picked_scores(rq, summ, picks[False], subs).equal(picked_scores(rq, summ, picks[True], subs))
        print(f"{row}, picked scores equal {same}", flush=True)


def main():
    for shape, sub, lengths in CASES:
        for n in lengths:
            run_length(shape, sub, n)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
