"""A/B: the committed two-pass threshold router (``scratch_old_select.py`` at the repo root, from
``git show a953a23:src/subquad/ops/ssa/triton_select.py``) against the working tree's, with the patch
applied. GPU, from the repo root: ``PYTHONPATH=src python ab.py [--tune]``."""

import itertools
import sys

import torch
import triton

sys.path.insert(0, ".")
import scratch_old_select as old  # noqa: E402, I001  (the old module beside the new one)
from subquad.ops.ssa import triton_select as new  # noqa: E402
from subquad.ops.ssa.config import SSAConfig  # noqa: E402
from subquad.ops.ssa.select import routing_queries, routing_summaries  # noqa: E402

SHAPES = {"layer-8b": (32, 8, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}
CASES = [
    ("layer-8b", 1 << 20, 1 << 20, None),
    ("layer-8b", 1 << 17, 1 << 17, None),
    ("small", 12 << 20, 1 << 16, None),
    ("nano", 1 << 20, 1 << 15, 4),
    ("layer-8b", 1 << 14, 1 << 14, None),
]
KNOBS = ("_THRESHOLD_BLOCK_M", "_THRESHOLD_NUM_WARPS", "_THRESHOLD_NUM_STAGES")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=2, rep=3)


def run_case(shape, n, queries, sub, tune):
    torch.manual_seed(0)
    heads, hkv, dim = SHAPES[shape]
    cfg = SSAConfig() if sub is None else SSAConfig(summary="max", sub_block_size=sub)
    q = torch.randn(1, queries, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, hkv, dim, device="cuda", dtype=torch.bfloat16)
    rq = routing_queries(q, hkv).bfloat16()
    summ = routing_summaries(k, cfg).bfloat16().contiguous()
    off = n - queries

    def route(module):
        return module.threshold_topk(rq, summ, off, cfg, True)

    a, ca = route(old)
    b, cb = route(new)
    same = (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
    ordered = (a == b).all(-1).float().mean().item()
    t_old = min(bench(lambda: route(old)) for _ in range(2))
    t_new = min(bench(lambda: route(new)) for _ in range(2))
    print(
        f"{shape} N={n} q={queries} sub={sub}: old {t_old:.2f} ms new {t_new:.2f} ms | same sets {same:.7f} "
        f"same order {ordered:.7f} | over cap old {(ca > 32).sum().item()} new {(cb > 32).sum().item()}, "
        f"new mean list {cb.float().mean().item():.2f} max {cb.max().item()}",
        flush=True,
    )
    if tune and shape in ("layer-8b", "small") and queries >= 1 << 16:
        default = [getattr(new, name) for name in KNOBS]
        for values in itertools.product((64, 128), (4, 8), (2, 3)):
            for name, value in zip(KNOBS, values):
                setattr(new, name, value)
            got, _ = route(new)
            print(
                f"   BLOCK_M, warps, stages {values}: {bench(lambda: route(new)):.2f} ms "
                f"same {bool((got == b).all())}",
                flush=True,
            )
        for name, value in zip(KNOBS, default):
            setattr(new, name, value)


for case in CASES:
    run_case(*case, tune=sys.argv[1:] == ["--tune"])
    torch.cuda.empty_cache()
