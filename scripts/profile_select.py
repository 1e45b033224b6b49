"""Time the stages of Triton flat routing at one length (layer-8b shape, default config).

Both exact routes: group top-k + rescore (``threshold=False``) and the two-pass threshold top-k
(the default), their agreement, and with ``--tune`` a sweep of the threshold kernel's launch knobs.

GPU:  PYTHONPATH=src python scripts/profile_select.py --length 1m [--tune]
      PYTHONPATH=src python scripts/profile_select.py --shape small --length 12m --queries 65536 --tune
      (the last prefill chunk of a 12M-token prompt for the `small` model's attention shape)
      PYTHONPATH=src python scripts/profile_select.py --shape nano --length 1m --queries 32k \
          --sub-block 4 --torch
      (blocks scored by their best 4-token sub-block, against the PyTorch reference router)
"""

import argparse
import itertools

import torch
import triton

from subquad.benchmark import parse_length
from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import _route_flat, routing_queries, routing_summaries, select_blocks

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by --tune (with --sub-block the warps are
# triton_select._THRESHOLD_SUBS_NUM_WARPS, else _THRESHOLD_NUM_WARPS).
TUNE = list(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3)))
# Attention shapes (Hq, Hkv, D): a Llama-3-8B-like layer, benchmarks' `long` and the flavors'.
SHAPES = {"layer-8b": (32, 8, 128), "long": (8, 2, 128), "small": (12, 2, 64), "nano": (5, 1, 64)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m", help="keys (tokens in the context)")
    parser.add_argument("--queries", default=None, help="route only the last this many tokens (default: all)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="layer-8b")
    parser.add_argument("--tune", action="store_true", help="sweep the threshold kernel's launch knobs")
    parser.add_argument(
        "--sub-block",
        type=int,
        default=None,
        help="score blocks by their best sub-block of this many keys (summary='max')",
    )
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference router")
    args = parser.parse_args()
    n = parse_length(args.length)
    queries = n if args.queries is None else parse_length(args.queries)
    if not 1 <= queries <= n:
        raise SystemExit(f"--queries {args.queries}: expected 1 .. {n} (the --length)")
    heads, heads_kv, dim = SHAPES[args.shape]
    cfg = SSAConfig() if args.sub_block is None else SSAConfig(summary="max", sub_block_size=args.sub_block)
    group = triton_select.FLAT_GROUP
    offset = n - queries
    q = torch.randn(1, queries, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, heads_kv, dim, device="cuda", dtype=torch.bfloat16)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=1, rep=1)

    t_rq = bench(lambda: routing_queries(q, heads_kv).bfloat16())
    t_summ = bench(lambda: routing_summaries(k, cfg).bfloat16().contiguous())
    rq = routing_queries(q, heads_kv).bfloat16()
    summ = routing_summaries(k, cfg).bfloat16().contiguous()
    groups = triton_select.top_groups(rq, summ, offset, cfg, group, True)
    t_groups = bench(lambda: triton_select.top_groups(rq, summ, offset, cfg, group, True))
    t_rescore = bench(lambda: triton_select.rescore_topk(rq, summ, groups, offset, cfg, group, True))
    t_threshold = bench(lambda: triton_select.threshold_topk(rq, summ, offset, cfg, True))
    t_all = bench(lambda: select_blocks(q, k, cfg))
    print(
        f"{args.shape}, N={n}, last {queries} tokens: routing queries {t_rq:.1f} ms, summaries "
        f"{t_summ:.1f} ms, top groups {t_groups:.1f} ms, rescore {t_rescore:.1f} ms, threshold top-k "
        f"{t_threshold:.1f} ms; select_blocks {t_all:.1f} ms"
    )
    if args.torch:
        t_torch = bench(lambda: _route_flat(rq.float(), summ.float(), n, cfg, True))
        want = _route_flat(rq.float(), summ.float(), n, cfg, True).sort(-1).values
        got = triton_select.route_flat_triton(rq, summ, n, cfg, True).sort(-1).values
        same = (want == got).all(-1).float().mean().item()
        print(f"PyTorch reference router (fp32) {t_torch:.1f} ms; rows with the Triton picks: {same:.4f}")
    old = triton_select.rescore_topk(rq, summ, groups, offset, cfg, group, True)
    new = triton_select.threshold_topk(rq, summ, offset, cfg, True)
    same = (old.sort(-1).values == new.sort(-1).values).all(-1).float().mean().item()
    print(f"threshold vs group top-k: rows with the same picks {same:.6f}")
    if args.tune:
        warps = "_THRESHOLD_SUBS_NUM_WARPS" if args.sub_block else "_THRESHOLD_NUM_WARPS"
        knobs = ("_THRESHOLD_BLOCK_M", "_THRESHOLD_BLOCK_N", warps, "_THRESHOLD_NUM_STAGES")
        default = [getattr(triton_select, name) for name in knobs]
        results = []
        for values in TUNE:
            for name, value in zip(knobs, values):
                setattr(triton_select, name, value)
            try:
                got = triton_select.threshold_topk(rq, summ, offset, cfg, True)
                ok = bool((got == new).all())
                ms = bench(lambda: triton_select.threshold_topk(rq, summ, offset, cfg, True))
            except Exception as err:  # noqa: BLE001  (out of resources for a tile size: skip it)
                print(f"  {values}: failed ({type(err).__name__})")
                continue
            results.append((ms, values, ok))
            print(f"  BLOCK_M, BLOCK_N, warps, stages = {values}: {ms:.1f} ms, same picks: {ok}")
        for name, value in zip(knobs, default):
            setattr(triton_select, name, value)
        ms, values, ok = min(results)
        print(f"best {values}: {ms:.1f} ms (same picks: {ok})")


if __name__ == "__main__":
    main()
