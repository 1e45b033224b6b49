"""Rank the needle's block under other block-scoring rules, from ``needle_routing.py --dump`` files.

A dump holds, per layer, the prompt's last routing query scored against every key before its local
window. Since a summary is a mean of keys, the score of any n-token summary is the mean of its keys'
scores, so each rule below is computed exactly from the dump, without the model:

* ``mean``: the block's mean key (``SSAConfig(summary="mean")``, what the model was trained with);
* ``maxN``: the best of the block's ``N``-token sub-block means (``summary="max", sub_block_size=N``);
* ``lseN@T``: ``T * log(mean(exp(s / T)))`` over the ``N``-token sub-block scores ``s``: ``max`` as
  ``T -> 0``, ``mean`` as ``T -> inf``;
* ``mixN``: half the routed budget by ``mean``, the rest by ``maxN`` (the block is routed if either
  ranks it within its half): reported as a rank only when routed.

Prints, per dump and rule, the needle block's rank in every layer (1 = best, ``*`` = within
``top_k``) and how many layers route it.

    PYTHONPATH=src python scripts/routing_rules.py /tmp/dump/*.pt --rules mean,max4,lse4@0.5,mix4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import torch


def sub_block_scores(token_scores: torch.Tensor, size: int, block_size: int) -> torch.Tensor:
    """``[H, keys]`` token scores (whole blocks) -> ``[H, blocks, block_size / size]`` sub-block means."""
    if size < 1 or block_size % size:
        raise ValueError(f"sub-block size {size}: expected a divisor of the block size {block_size}")
    heads, keys = token_scores.shape
    return token_scores.view(heads, keys // block_size, block_size // size, size).mean(-1)


def rule_scores(rule: str, token_scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block scores ``[H, blocks]`` under ``rule`` (``mean``, ``maxN``, ``lseN@T``)."""
    if rule == "mean":
        return sub_block_scores(token_scores, block_size, block_size)[..., 0]
    if rule.startswith("max"):
        return sub_block_scores(token_scores, int(rule[3:]), block_size).amax(-1)
    if rule.startswith("lse"):
        size, temperature = rule[3:].split("@")
        sub = sub_block_scores(token_scores, int(size), block_size)
        t = float(temperature)
        return t * (torch.logsumexp(sub / t, dim=-1) - math.log(sub.shape[-1]))
    raise ValueError(f"rule {rule!r}: expected mean, maxN or lseN@T")


def needle_rank(scores: torch.Tensor, target: int, first: int) -> list[int]:
    """Rank per head of block ``target`` among candidate blocks ``first..`` (1 = best)."""
    candidates = scores[:, first:]
    target_score = candidates[:, target - first]
    return ((candidates > target_score[:, None]).sum(-1) + 1).tolist()


def layer_rank(rule: str, token_scores: torch.Tensor, dump: dict) -> tuple[int | None, bool]:
    """(best rank over heads or None, routed?) of the needle's block in one layer under ``rule``."""
    bs, first, top_k = dump["block_size"], dump["sink_blocks"], dump["top_k"]
    target = dump["needle_token"] // bs
    if rule.startswith("mix"):
        by_mean = min(needle_rank(rule_scores("mean", token_scores, bs), target, first))
        by_max = min(needle_rank(rule_scores("max" + rule[3:], token_scores, bs), target, first))
        half = top_k // 2
        routed = by_mean <= half or by_max <= top_k - half
        return (min(by_mean, by_max) if routed else None), routed
    rank = min(needle_rank(rule_scores(rule, token_scores, bs), target, first))
    return rank, rank <= top_k


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dumps", nargs="+", help="files written by needle_routing.py --dump")
    parser.add_argument("--rules", default="mean,max16,max4,max1,lse4@0.25,lse4@0.5,lse4@1,mix4")
    parser.add_argument("--out", default=None, help="JSON file for the ranks")
    args = parser.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    for rule in rules:
        if not re.fullmatch(r"mean|max\d+|mix\d+|lse\d+@\d*\.?\d+", rule):
            raise SystemExit(f"--rules: {rule!r} is not mean, maxN, mixN or lseN@T (e.g. max4, lse4@0.5)")
    results = []
    for path in args.dumps:
        dump = torch.load(path, weights_only=True)
        target = dump["needle_token"] // dump["block_size"]
        candidates = dump["layers"][0]["token_scores"].shape[1] // dump["block_size"] - dump["sink_blocks"]
        name = os.path.basename(path)
        if not dump["sink_blocks"] <= target < dump["sink_blocks"] + candidates:
            print(f"{name}: the needle's block {target} is a sink or local block: always attended")
            continue
        print(f"{name}: needle block {target} of {candidates} candidates, top_k {dump['top_k']}")
        for rule in rules:
            ranks = [layer_rank(rule, layer["token_scores"].float(), dump) for layer in dump["layers"]]
            cells = " ".join("-" if r is None else f"{r}{'*' if ok else ''}" for r, ok in ranks)
            routed = sum(ok for _, ok in ranks)
            print(f"  {rule:>10}: {cells}   ({routed} of {len(ranks)} layers route it)")
            results.append({"dump": os.path.basename(path), "rule": rule, "ranks": [r for r, _ in ranks],
                            "routed": [ok for _, ok in ranks], "candidates": candidates})  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
