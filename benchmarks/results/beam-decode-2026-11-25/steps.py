"""One decode step's beam routing over a cache layer's summaries: node bounds kept across steps
(``BeamLevels``, as models decode since item 84 of benchmarks/NOTES.md) against built from every summary
(``kept=None``: the path every beam step took before). ``small``'s attention shape (Hq 12, Hkv 2, D 64 by
default), default SSA config, one row. Prints a JSON line per length: median ms of ``decode_select`` for
each, and whether the picks agree.

    PYTHONPATH=src python benchmarks/results/beam-decode-2026-11-25/steps.py --device cuda
"""

import argparse
import json
import statistics
import time

import torch

import subquad
from subquad.ops.ssa.triton_decode import BeamLevels, decode_plan, decode_select


def median_ms(fn, device, repeats):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples), out


def measure(length, heads, config, device, repeats):
    """The JSON row of one length."""
    heads_q, heads_kv, dim = heads
    num_blocks = -(-length // config.block_size)
    summaries = torch.randn(1, num_blocks, heads_kv, dim, device=device)
    seqlens = torch.tensor([length], device=device)
    plan = decode_plan(seqlens, num_blocks, config, [length])
    q = torch.randn(1, heads_q, dim, device=device, dtype=torch.bfloat16)
    row = {"tokens": length, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    picks = {}
    for name, kept in (("rebuilt_ms", None), ("kept_ms", BeamLevels())):
        row[name], picks[name] = median_ms(
            lambda kept=kept: decode_select(q, summaries, seqlens, config, plan, kept), device, repeats
        )
    a, b = (picks[n].sort(-1).values for n in ("rebuilt_ms", "kept_ms"))
    row["same_picks_share"] = (a == b).float().mean().item()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="*", default=[1 << 17, 1 << 20, 1 << 22, 12 << 20])
    p.add_argument("--heads", type=int, nargs=3, default=[12, 2, 64], metavar=("HQ", "HKV", "D"))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    for length in args.lengths:
        row = measure(
            length, args.heads, subquad.SSAConfig(index="beam"), torch.device(args.device), args.repeats
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
