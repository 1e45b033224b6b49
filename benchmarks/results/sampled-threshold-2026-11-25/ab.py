"""The flat threshold router with pass 1 sampled (NOTES item 75): ``route_flat_triton`` end to end with
``_THRESHOLD_SAMPLE`` = 1 (the committed two passes: cut lists, then the repair launch) against pass 1
scoring every S-th middle chunk (one launch, lists that keep the best). Random inputs unless a repeat
period is given (exact ties); the picks are checked against S = 1's.
GPU, from the repo root: ``PYTHONPATH=src python benchmarks/results/sampled-threshold-2026-11-25/ab.py``."""

import torch
import triton

from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import routing_queries, routing_summaries

SHAPES = {"layer-8b": (32, 8, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}
# shape, keys, queries (the last ones), sub-block size (None: mean summaries), repeat period, samples
CASES = [
    ("nano", 1 << 20, 1 << 15, 4, None, (1, 2, 4, 8)),
    ("nano", 12 << 20, 1 << 15, 4, None, (1, 2, 4, 8)),
    ("layer-8b", 1 << 20, 1 << 20, None, None, (1, 2, 4)),
    ("small", 12 << 20, 1 << 16, None, None, (1, 2, 4)),
    ("nano", 1 << 20, 1 << 15, 4, 1 << 13, (1, 4)),  # text repeating every 8K tokens: exact ties
    ("layer-8b", 1 << 17, 1 << 17, None, 1 << 12, (1, 4)),
]


def bench(fn):
    return min(triton.testing.do_bench(fn, warmup=2, rep=5) for _ in range(2))


def picked_scores(rq, summ, picked, subs, rows=256):
    """Sorted routing scores of the picks of the last ``rows`` tokens (ties make ids differ, not these)."""
    scores = torch.einsum("bthd,bnhd->bhtn", rq[:, -rows:].float(), summ.float())
    scores = scores.unflatten(-1, (-1, subs)).amax(-1)
    got = scores.gather(-1, picked[:, :, -rows:].long().clamp(min=0))
    return got.masked_fill(picked[:, :, -rows:] < 0, float("-inf")).sort(-1).values


def run_case(shape, n, queries, sub, period, samples):
    torch.manual_seed(0)
    heads, hkv, dim = SHAPES[shape]
    cfg = SSAConfig() if sub is None else SSAConfig(summary="max", sub_block_size=sub)
    q = torch.randn(1, queries, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, period or n, hkv, dim, device="cuda", dtype=torch.bfloat16)
    if period:
        k = k.repeat(1, n // period, 1, 1)
    rq = routing_queries(q, hkv).bfloat16()
    summ = routing_summaries(k, cfg).bfloat16().contiguous()
    del q, k
    subs = cfg.summaries_per_block
    row = f"{shape} N={n} q={queries} sub={sub} period={period}:"
    base = None
    for sample in samples:
        triton_select._THRESHOLD_SAMPLE = (sample, sample)
        got = triton_select.route_flat_triton(rq, summ, n, cfg, True)
        ms = bench(lambda: triton_select.route_flat_triton(rq, summ, n, cfg, True))
        if base is None:
            base = got
            row += f" S=1 {ms:.2f} ms"
            continue
        same = (base.sort(-1).values == got.sort(-1).values).all(-1).float().mean().item()
        scores = picked_scores(rq, summ, base, subs).equal(picked_scores(rq, summ, got, subs))
        row += f" | S={sample} {ms:.2f} ms, rows with S=1's picks {same:.6f}, last 256 scores equal {scores}"
    print(row, flush=True)


def main():
    default = triton_select._THRESHOLD_SAMPLE
    try:
        for case in CASES:
            run_case(*case)
            torch.cuda.empty_cache()
    finally:
        triton_select._THRESHOLD_SAMPLE = default


if __name__ == "__main__":
    main()
