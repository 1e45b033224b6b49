"""Rows whose picks differ between two code trees, and how far apart their picks' scores are.

    PYTHONPATH=<base tree>/src python differing_rows.py --save /tmp/picks.pt   # the base tree's picks
    PYTHONPATH=src python differing_rows.py --against /tmp/picks.pt            # this tree's, compared

Same random inputs as ``../routing-pass2-2026-11-26/ab.py`` (layer-8b, seed 0). For each row whose set
of picks differs, both sets' routing scores are recomputed in fp32 from the same bf16 inputs and sorted;
the line printed per row gives the largest difference between the two sorted score lists, against the
gap between that row's k-th and (k+1)-th best scores over all its candidates.
"""

import argparse
import json

import torch

from subquad.benchmark import parse_length
from subquad.ops.ssa import triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import routing_queries, routing_summaries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="1m")
    parser.add_argument("--save", default=None)
    parser.add_argument("--against", default=None)
    args = parser.parse_args()
    n = parse_length(args.length)
    cfg = SSAConfig()
    torch.manual_seed(0)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
    rq = routing_queries(q, 8).bfloat16()
    summ = routing_summaries(k, cfg).bfloat16().contiguous()
    del q, k
    picks = triton_select.threshold_topk(rq, summ, 0, cfg, True)
    if args.save:
        torch.save(picks.cpu(), args.save)
        return
    base = torch.load(args.against).cuda()
    differ = (picks.sort(-1).values != base.sort(-1).values).any(-1)  # [B, Hkv, T]
    rows = differ.nonzero().tolist()
    print(json.dumps({"rows": picks[..., 0].numel(), "rows_differing": len(rows)}))
    for b, h, t in rows:
        r = rq[b, t, h].float()
        scores = summ[b, :, h].float() @ r  # every block's score; candidates are those before the window
        last = (t // cfg.block_size) - cfg.local_blocks + 1
        cand = scores[cfg.sink_blocks : max(cfg.sink_blocks, last)]
        top = cand.topk(min(cfg.top_k + 1, cand.numel())).values
        got = scores[picks[b, h, t].long()].sort(descending=True).values
        was = scores[base[b, h, t].long()].sort(descending=True).values
        print(
            json.dumps(
                {
                    "head": h,
                    "token": t,
                    "max_score_diff": float((got - was).abs().max()),
                    "kth_gap": float(top[-2] - top[-1]),
                    "kth": float(top[-2]),
                }
            )
        )


if __name__ == "__main__":
    main()
