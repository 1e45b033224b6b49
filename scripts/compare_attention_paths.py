"""Query-major vs routed (key-major) sparse attention on the same selection: agreement and time.

Forward (``--length``, default 1m) and, with ``--backward LENGTHS``, the backward at those lengths:
max |difference| of dq/dk/dv between the paths, each path's time, and a sweep of the routed
backward's launch knobs (``--tune``: warps x rows per step x pairs per segment).

GPU:  PYTHONPATH=src python scripts/compare_attention_paths.py --length 1m
      PYTHONPATH=src python scripts/compare_attention_paths.py --length '' --backward 16k,128k --tune
"""

import argparse
import itertools

import torch

import subquad
from subquad.benchmark import median_timer, parse_length
from subquad.ops.ssa import triton_attention, triton_routed
from subquad.ops.ssa.tiles import build_query_tiles

SCALE = 128**-0.5


def _inputs(n: int):
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sel = subquad.select_blocks(q, k, subquad.SSAConfig())
    return q, k, v, sel.block_idx, sel.num_fixed_slots


def forward(n: int, timed) -> None:
    q, k, v, idx, fixed = _inputs(n)
    with torch.no_grad():
        o1, l1, _ = triton_attention.sparse_attention_fwd(q, k, v, idx, 64, True, SCALE)
        o2, l2, _ = triton_routed.sparse_attention_fwd_routed(q, k, v, idx, 64, True, SCALE, fixed)
        print(
            f"forward N={n} max |out diff| {(o1.float() - o2.float()).abs().max().item():.2e}, "
            f"max |lse diff| {(l1 - l2).abs().max().item():.2e}"
        )
        del o1, o2, l1, l2
        torch.cuda.reset_peak_memory_stats()
        routed = timed(
            lambda: triton_routed.sparse_attention_fwd_routed(q, k, v, idx, 64, True, SCALE, fixed)
        )
        peak = torch.cuda.max_memory_allocated() / 2**30
        fixed_only = timed(
            lambda: triton_attention.sparse_attention_fwd(
                q, k, v, idx[..., :fixed].contiguous(), 64, True, SCALE
            )
        )
        query_major = timed(lambda: triton_attention.sparse_attention_fwd(q, k, v, idx, 64, True, SCALE))
    print(
        f"forward N={n} routed {routed:.1f} ms (peak {peak:.1f} GiB), fixed part alone {fixed_only:.1f} ms, "
        f"query-major {query_major:.1f} ms"
    )


def backward(n: int, timed, tune: bool) -> None:
    q, k, v, idx, fixed = _inputs(n)
    do = torch.randn_like(q)
    out, lse, tiles = triton_attention.sparse_attention_fwd(q, k, v, idx, 64, True, SCALE)
    want = triton_attention.sparse_attention_bwd(do, q, k, v, out, lse, tiles, 64, True, SCALE)

    def routed():
        return triton_routed.sparse_attention_bwd_routed(do, q, k, v, out, lse, idx, 64, True, SCALE, fixed)

    got = routed()
    diffs = ", ".join(
        f"d{name} {(g.float() - w.float()).abs().max().item():.2e} (max |d{name}| {w.abs().max().item():.2e})"
        for name, g, w in zip("qkv", got, want)
    )
    print(f"backward N={n} max |diff| {diffs}")
    del got, want
    query_major = timed(
        lambda: triton_attention.sparse_attention_bwd(do, q, k, v, out, lse, tiles, 64, True, SCALE)
    )
    torch.cuda.reset_peak_memory_stats()
    routed_ms = timed(routed)
    peak = torch.cuda.max_memory_allocated() / 2**30
    fixed_tiles = build_query_tiles(idx[..., :fixed].contiguous(), tiles.tokens_per_tile)
    fixed_only = timed(
        lambda: triton_attention.sparse_attention_bwd(do, q, k, v, out, lse, fixed_tiles, 64, True, SCALE)
    )
    print(
        f"backward N={n} routed {routed_ms:.1f} ms (peak {peak:.1f} GiB), "
        f"fixed part alone {fixed_only:.1f} ms, query-major {query_major:.1f} ms"
    )
    if not tune:
        return
    knobs = ("_BWD_NUM_WARPS", "_BWD_ROUTED_ROWS", "_BWD_SEGMENT_TOKENS")
    default = tuple(getattr(triton_routed, name) for name in knobs)
    results = []
    for values in itertools.product((4, 8), (32, 64, 128), (128, 256, 512)):
        for name, value in zip(knobs, values):
            setattr(triton_routed, name, value)
        try:
            results.append((timed(routed), values))
        except Exception as err:  # noqa: BLE001 (a knob set the compiler refuses: out of resources)
            print(f"  tune {values}: {type(err).__name__}")
    for name, value in zip(knobs, default):
        setattr(triton_routed, name, value)
    for ms, values in sorted(results)[:6]:
        print(f"  tune N={n} warps {values[0]} rows {values[1]} segment {values[2]}: {ms:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m", help="forward comparison length ('': skip)")
    parser.add_argument("--backward", default="", help="comma-separated backward lengths, e.g. 16k,128k")
    parser.add_argument("--tune", action="store_true", help="sweep the routed backward's launch knobs")
    args = parser.parse_args()
    timed = median_timer(torch.device("cuda"), warmup=1, reps=3)
    if args.length:
        forward(parse_length(args.length), timed)
    for length in filter(None, args.backward.split(",")):
        backward(parse_length(length), timed, args.tune)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
