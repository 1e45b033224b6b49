"""Would routing one chunk of queries while the previous chunk's attention runs pay? (issue 2)

The layer-8b shape at 1M (random bf16 inputs, default config). The router is arithmetic-bound and the
routed attention kernels are bandwidth-bound, so running them side by side on two streams could hide
part of one under the other, if the GPU puts programs of both kernels on an SM at once. Times, each the
median of 5 after a warm-up:

- ``serial``: ``select_blocks`` + ``ssa_attention(selection=...)`` over all queries (the two phases);
- ``chunked``: the same per chunk of queries (``q[:, c0:c1]`` against ``k[:, :c1]``), one stream;
- ``pipelined``: chunk i's routing on one stream while chunk i-1's attention runs on another;
- ``side by side``: all of the routing and all of the attention (of an earlier selection) launched at
  once on two streams, against the sum of their times alone.

    PYTHONPATH=src python benchmarks/results/routed-step-2026-11-26/overlap.py --length 1m --chunk 128k
"""

import argparse
import json

import torch

import subquad
from subquad.benchmark import median_timer, parse_length
from subquad.ops.ssa.select import routing_summaries
from subquad.ops.ssa.triton_attention import sparse_attention_triton


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    parser.add_argument("--chunk", default="128k")
    args = parser.parse_args()
    n, chunk = parse_length(args.length), parse_length(args.chunk)
    torch.manual_seed(0)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    config = subquad.SSAConfig()
    summaries = routing_summaries(k, config)
    starts = list(range(0, n, chunk))

    def route(c0, c1):
        return subquad.select_blocks(
            q[:, c0:c1], k[:, :c1], config, summaries=summaries[:, : c1 // config.summary_size]
        )

    def attend(c0, c1, sel):  # the kernels without ssa_attention's check of the selection (a host sync)
        return sparse_attention_triton(
            q[:, c0:c1],
            k[:, :c1],
            v[:, :c1],
            sel.block_idx,
            sel.block_size,
            True,
            None,
            sel.num_fixed_slots,
            sel.fixed_layout,
        )

    if chunk % config.block_size:
        raise SystemExit(f"--chunk {args.chunk}: expected a multiple of the block size")
    timer = median_timer(torch.device("cuda"), warmup=1, reps=5)
    results = {}
    with torch.no_grad():
        full = route(0, n)
        results["select"] = timer(lambda: route(0, n))
        results["attention"] = timer(lambda: attend(0, n, full))
        results["serial"] = results["select"] + results["attention"]

        def chunked():
            for c0 in starts:
                c1 = min(n, c0 + chunk)
                attend(c0, c1, route(c0, c1))

        results["chunked"] = timer(chunked)
        side, main_stream = torch.cuda.Stream(), torch.cuda.current_stream()

        def pipelined():
            side.wait_stream(main_stream)
            pending = None
            # Every selection is kept to the end: one freed while the other stream still reads it could be
            # handed out again by the main stream's allocator (the first version of this script did that).
            kept = []
            for c0 in starts:
                c1 = min(n, c0 + chunk)
                selection = route(c0, c1)  # main stream
                kept.append(selection)
                routed = torch.cuda.Event()
                routed.record(main_stream)
                if pending is not None:
                    with torch.cuda.stream(side):
                        attend(*pending)
                side.wait_event(routed)
                pending = (c0, c1, selection)
            with torch.cuda.stream(side):
                attend(*pending)
            main_stream.wait_stream(side)

        results["pipelined"] = timer(pipelined)

        def side_by_side():
            side.wait_stream(main_stream)
            with torch.cuda.stream(side):
                attend(0, n, full)
            route(0, n)
            main_stream.wait_stream(side)

        results["side by side"] = timer(side_by_side)
    print(json.dumps({name: round(ms, 1) for name, ms in results.items()}))
    for name, ms in results.items():
        print(f"  {name:>13}: {ms:8.1f} ms")


if __name__ == "__main__":
    main()
