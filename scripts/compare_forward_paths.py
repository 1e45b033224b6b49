"""Query-major vs routed (key-major) sparse forward on the same selection: agreement and time.

GPU:  PYTHONPATH=src python scripts/compare_forward_paths.py --length 1m
"""

import argparse

import torch

import subquad
from subquad.benchmark import median_timer, parse_length
from subquad.ops.ssa import triton_attention, triton_routed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    args = parser.parse_args()
    n = parse_length(args.length)
    timed = median_timer(torch.device("cuda"), warmup=1, reps=3)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sel = subquad.select_blocks(q, k, subquad.SSAConfig())
    idx, scale, fixed = sel.block_idx, 128**-0.5, sel.num_fixed_slots
    with torch.no_grad():
        o1, l1, _ = triton_attention.sparse_attention_fwd(q, k, v, idx, 64, True, scale)
        o2, l2 = triton_routed.sparse_attention_fwd_routed(q, k, v, idx, 64, True, scale, fixed)
        print(
            f"N={n} max |out diff| {(o1.float() - o2.float()).abs().max().item():.2e}, "
            f"max |lse diff| {(l1 - l2).abs().max().item():.2e}"
        )
        del o1, o2, l1, l2
        torch.cuda.reset_peak_memory_stats()
        routed = timed(
            lambda: triton_routed.sparse_attention_fwd_routed(q, k, v, idx, 64, True, scale, fixed)
        )
        peak = torch.cuda.max_memory_allocated() / 2**30
        fixed_only = timed(
            lambda: triton_attention.sparse_attention_fwd(
                q, k, v, idx[..., :fixed].contiguous(), 64, True, scale
            )
        )
        query_major = timed(lambda: triton_attention.sparse_attention_fwd(q, k, v, idx, 64, True, scale))
    print(
        f"N={n} routed {routed:.1f} ms (peak {peak:.1f} GiB), fixed part alone {fixed_only:.1f} ms, "
        f"query-major {query_major:.1f} ms"
    )


if __name__ == "__main__":
    main()
