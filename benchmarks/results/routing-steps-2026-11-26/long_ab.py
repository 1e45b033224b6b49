"""Time one ``subquad.ssa_attention`` call (routing included) of the ``long`` shape (B=1, Hq 8, Hkv 2,
D 128, bf16, causal) with a given index, for one set of module constants of ``subquad.ops.ssa``.

    PYTHONPATH=src python long_ab.py --length 12m --index beam [--set triton_routed._PARTIAL_BYTES=N]

Prints one JSON line: the median of 3 calls after one warm-up, and the peak memory.
"""

import argparse
import importlib
import json

import torch

import subquad
from subquad.benchmark import median_timer, parse_length


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    parser.add_argument("--index", default="beam")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    for item in args.set:
        name, value = item.split("=")
        module, const = name.rsplit(".", 1)
        setattr(importlib.import_module(f"subquad.ops.ssa.{module}"), const, int(value))
    n = parse_length(args.length)
    gen = torch.Generator(device="cuda").manual_seed(n + 16)
    q = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, n, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, n, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    config = subquad.SSAConfig(index=args.index)
    torch.cuda.reset_peak_memory_stats()
    timed = median_timer(torch.device("cuda"), warmup=1, reps=3)
    ms = timed(lambda: subquad.ssa_attention(q, k, v, config=config))
    peak = torch.cuda.max_memory_allocated() / 2**30
    record = dict(length=args.length, index=args.index, set=args.set)
    print(json.dumps(record | dict(median_ms=round(ms, 1), peak_gib=round(peak, 1))))


if __name__ == "__main__":
    main()
