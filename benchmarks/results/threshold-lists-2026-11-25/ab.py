"""A/B of the flat threshold router (NOTES item 73): the tree before it (``_old_select.py`` at the repo
root, from ``git show 4c1643c:src/subquad/ops/ssa/triton_select.py``: lists cut at CAP, a host check,
reroutes) against the working tree's, with lists of 2 K_PAD and of K_PAD. ``route_flat_triton`` end to
end, so the old tree's check and reroutes are in its time. Run against three working trees: call 1
lists that always keep the best, call 2 the same searching the minimum only while a list is full,
call 3 the committed one (cut lists, then a repair launch for the tiles with a cut list).
GPU, from the repo root: ``PYTHONPATH=src python benchmarks/results/threshold-lists-2026-11-25/ab.py``."""

import sys

import torch
import triton

sys.path.insert(0, ".")
import _old_select as old  # noqa: E402, I001  (the old module beside the new one)
from subquad.ops.ssa import triton_select as new  # noqa: E402
from subquad.ops.ssa.config import SSAConfig  # noqa: E402
from subquad.ops.ssa.select import routing_queries, routing_summaries  # noqa: E402

SHAPES = {"layer-8b": (32, 8, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}
# shape, keys, queries (the last ones), sub-block size (None: mean summaries), repeat period in tokens
CASES = [
    ("layer-8b", 1 << 20, 1 << 20, None, None),
    ("small", 12 << 20, 1 << 16, None, None),
    ("nano", 1 << 20, 1 << 15, 4, None),
    ("nano", 2 << 20, 1 << 15, 4, None),
    ("nano", 1 << 20, 1 << 15, 4, 1 << 13),  # text repeating every 8K tokens: exact ties
    ("layer-8b", 1 << 17, 1 << 17, None, 1 << 12),
]


def bench(fn):
    return min(triton.testing.do_bench(fn, warmup=2, rep=5) for _ in range(2))


def picked_scores(rq, summ, picked, subs, rows=256):
    """Sorted routing scores of the picks of the last ``rows`` tokens (ties make ids differ, not these)."""
    scores = torch.einsum("bthd,bnhd->bhtn", rq[:, -rows:].float(), summ.float())
    scores = scores.unflatten(-1, (-1, subs)).amax(-1)
    got = scores.gather(-1, picked[:, :, -rows:].long().clamp(min=0))
    return got.masked_fill(picked[:, :, -rows:] < 0, float("-inf")).sort(-1).values


def route(module, rq, summ, n, cfg):
    return module.route_flat_triton(rq, summ, n, cfg, True)


def run_case(shape, n, queries, sub, period):
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
    args = (rq, summ, n, cfg)
    a = route(old, *args)
    t_old = bench(lambda: route(old, *args))
    count = old.threshold_topk(rq, summ, n - queries, cfg, True)[1]
    cut = (count > old._THRESHOLD_CAP_PER_K * 16).any(0).any(0).sum().item()
    row = f"{shape} N={n} q={queries} sub={sub} period={period}: old {t_old:.2f} ms ({cut} rows cut)"
    for cap in (2, 1):
        new._THRESHOLD_CAP_PER_K = cap
        b = route(new, *args)
        t_new = bench(lambda: route(new, *args))
        same = (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
        subs = cfg.summaries_per_block
        scores = picked_scores(rq, summ, a, subs).equal(picked_scores(rq, summ, b, subs))
        row += (
            f" | new CAP {cap} K_PAD {t_new:.2f} ms, rows with the old picks {same:.6f}, "
            f"last 256 rows' picked scores equal: {scores}"
        )
    new._THRESHOLD_CAP_PER_K = 2
    print(row, flush=True)


def main():
    for case in CASES:
        run_case(*case)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
