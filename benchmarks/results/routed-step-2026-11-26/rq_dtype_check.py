"""Picks of the Triton router from routing queries summed into bf16 (now) and into float32 then rounded
(before item 98), on the same random layer-8b inputs: rows that differ, and whether the two query sums
differ at all.

    PYTHONPATH=src python benchmarks/results/routed-step-2026-11-26/rq_dtype_check.py --length 1m
"""

import argparse

import torch

import subquad
from subquad.benchmark import parse_length
from subquad.ops.ssa.select import route, routing_queries, routing_summaries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    n = parse_length(parser.parse_args().length)
    torch.manual_seed(0)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    config = subquad.SSAConfig()
    summaries = routing_summaries(k, config)
    via_fp32 = routing_queries(q, 8).bfloat16()
    direct = routing_queries(q, 8, torch.bfloat16)
    print(f"rq elements that differ: {int((via_fp32 != direct).sum())} of {direct.numel()}")
    a = route(via_fp32, summaries, n, config, True).sort(-1).values
    b = route(direct, summaries, n, config, True).sort(-1).values
    rows = (a != b).any(-1)
    print(f"rows with other picks: {int(rows.sum())} of {rows.numel()}")


if __name__ == "__main__":
    main()
