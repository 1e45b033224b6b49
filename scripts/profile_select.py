"""Time the stages of Triton flat routing (group max, probe top-k, rescore) at one length.

GPU:  PYTHONPATH=src python scripts/profile_select.py --length 1m --groups 8,16,32
"""

import argparse

import torch
import triton

from subquad.benchmark import parse_length
from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import block_summaries, routing_queries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    parser.add_argument("--groups", default="8,16,32")
    args = parser.parse_args()
    n = parse_length(args.length)
    cfg = SSAConfig()
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    rq = routing_queries(q, 8).bfloat16()
    summ = block_summaries(k, 64).bfloat16().contiguous()
    chunk = 1 << 15
    rq_c = rq[:, :chunk]
    offset = n - chunk  # the most expensive chunk: the last tokens see every block
    for group in (int(x) for x in args.groups.split(",")):
        gmax = triton_select.group_max_scores(rq_c, summ, offset, cfg, group, True)
        values, groups = gmax.topk(16, dim=-1)
        groups = groups.int()
        t_gmax = triton.testing.do_bench(lambda: triton_select.group_max_scores(rq_c, summ, offset, cfg, group, True))
        t_topk = triton.testing.do_bench(lambda: gmax.topk(16, dim=-1))
        t_resc = triton.testing.do_bench(
            lambda: triton_select.rescore_topk(rq_c, summ, groups, offset, cfg, group, True))
        t_all = triton.testing.do_bench(
            lambda: triton_select.route_flat_triton(rq, summ, n, cfg, True, group=group), warmup=1, rep=1)
        print(f"N={n} group={group} last-32K-chunk: group_max {t_gmax:.2f} ms, topk {t_topk:.2f} ms, "
              f"rescore {t_resc:.2f} ms; whole flat routing {t_all:.1f} ms")


if __name__ == "__main__":
    main()
