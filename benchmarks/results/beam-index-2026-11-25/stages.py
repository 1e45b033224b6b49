"""Where `index="beam"` routing spends its time, `long` shape (Hkv=2, D=128), random inputs.

    PYTHONPATH=src python benchmarks/results/beam-index-2026-11-25/stages.py --lengths 1m,12m

Per length: the flat router, the whole beam route for a few (tree_group, tree_probe) shapes, and the
default shape's stages run one after another over all tokens at once (``route_beam_triton`` does the
same work in chunks of tokens): the node bounds, level 2 (the flat router's kernels over the level-2
bounds), level 1 and the blocks (``rescore_topk``). Medians of CUDA-event timings, in ms.
"""

import argparse
import json

import torch

from subquad import SSAConfig
from subquad.benchmark import median_timer, parse_length
from subquad.ops.ssa import select, triton_select


def measure(n: int, shapes: list[str], timed) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(n)
    rq = torch.randn(1, n, 2, 128, device=dev, generator=gen).mul_(2).bfloat16()  # 4 query heads summed
    summaries = select.block_summaries(torch.randn(1, n, 2, 128, device=dev, generator=gen).bfloat16(), 64)
    summaries = summaries.bfloat16().contiguous()
    row = {
        "seq_len": n,
        "flat": timed(lambda: triton_select.route_flat_triton(rq, summaries, n, SSAConfig(), True)),
    }
    for shape in shapes:
        group, probe = (int(x) for x in shape.split("x"))
        cfg = SSAConfig(index="beam", tree_group=group, tree_probe=probe)
        row[f"beam {shape}"] = timed(
            lambda cfg=cfg: triton_select.route_beam_triton(rq, summaries, n, cfg, True)
        )
    # The default shape's stages (route_beam_triton unrolled, one chunk).
    cfg = SSAConfig(index="beam")
    fanout, width = select.beam_shape(cfg)
    shift = (cfg.local_blocks - 1) * cfg.block_size
    lv = [SSAConfig(block_size=64 * fanout**k, top_k=width, sink_blocks=0, local_blocks=1) for k in (1, 2)]
    row["bounds"] = timed(lambda: select.beam_levels(summaries, cfg))
    level1, level2 = (t.bfloat16().contiguous() for t in select.beam_levels(summaries, cfg))
    feats = select.beam_queries(rq)
    row["features"] = timed(lambda: select.beam_queries(rq))
    row["level 2"] = timed(lambda: triton_select.route_flat_triton(feats, level2, n - shift, lv[1], True))
    top2 = triton_select.route_flat_triton(feats, level2, n - shift, lv[1], True)
    window = (torch.arange(n, device=dev) // 64 - 1).clamp(min=0)
    parents2 = torch.cat([top2, (window // fanout**2).int().view(1, 1, -1, 1).expand(1, 2, -1, 1)], -1)
    row["level 1"] = timed(
        lambda: triton_select.rescore_topk(feats, level1, parents2, -shift, lv[0], fanout, True)
    )
    top1 = triton_select.rescore_topk(feats, level1, parents2, -shift, lv[0], fanout, True)
    parents1 = torch.cat([top1, (window // fanout).int().view(1, 1, -1, 1).expand(1, 2, -1, 1)], -1)
    row["blocks"] = timed(lambda: triton_select.rescore_topk(rq, summaries, parents1, 0, cfg, fanout, True))
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1m,12m")
    p.add_argument(
        "--shapes", default="8x16,16x16,8x8", help="tree_group x tree_probe of the whole-route rows"
    )
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    timed = median_timer(torch.device("cuda"), 1, args.reps)
    for n in (parse_length(x) for x in args.lengths.split(",")):
        row = measure(n, args.shapes.split(","), timed)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
