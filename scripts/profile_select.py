"""Time the stages of Triton flat routing at one length (layer-8b shape, default config).

GPU:  PYTHONPATH=src python scripts/profile_select.py --length 1m
"""

import argparse

import torch
import triton

from subquad.benchmark import parse_length
from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import block_summaries, routing_queries, select_blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    args = parser.parse_args()
    n = parse_length(args.length)
    cfg = SSAConfig()
    group = triton_select.FLAT_GROUP
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=1, rep=1)

    t_rq = bench(lambda: routing_queries(q, 8).bfloat16())
    t_summ = bench(lambda: block_summaries(k, 64).bfloat16().contiguous())
    rq = routing_queries(q, 8).bfloat16()
    summ = block_summaries(k, 64).bfloat16().contiguous()
    groups = triton_select.top_groups(rq, summ, 0, cfg, group, True)
    t_groups = bench(lambda: triton_select.top_groups(rq, summ, 0, cfg, group, True))
    t_rescore = bench(lambda: triton_select.rescore_topk(rq, summ, groups, 0, cfg, group, True))
    t_all = bench(lambda: select_blocks(q, k, cfg))
    print(
        f"N={n}: routing queries {t_rq:.1f} ms, summaries {t_summ:.1f} ms, top groups {t_groups:.1f} ms, "
        f"rescore {t_rescore:.1f} ms; select_blocks {t_all:.1f} ms"
    )


if __name__ == "__main__":
    main()
