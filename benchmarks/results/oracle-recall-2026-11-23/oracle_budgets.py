"""Oracle recall against the routed budget, on the shipped model's own activations (one window).

The model runs once with its own routing (the activations are the shipped model's, whatever budget is
asked about). In every layer the selection's fixed slots (sink + local) are kept and ``top_k`` empty
routed slots appended, so ``subquad.eval.recall.oracle_recall`` fills them with the ``top_k`` blocks of
most dense mass: the best any router could do with that many routed blocks. Two variants:

* ``shared``: one selection per KV head (the model's rule: its query heads share it);
* ``per_head``: each query head its own selection (what a per-query-head router could reach).

    PYTHONPATH=src python benchmarks/results/oracle-recall-2026-11-23/oracle_budgets.py \\
        --model src/subquad/assets/subquad-nano --corpus /tmp/oracle-corpus --length 32k \\
        --budgets 16,32,64,128,256 --max-queries 2048 --out oracle-budgets.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from subquad.benchmark import parse_length
from subquad.eval.recall import _attention_modules, _load_model, oracle_recall
from subquad.ops.ssa.select import SSASelection
from subquad.train.data import load_split


def budget_selection(selection: SSASelection, top_k: int, repeat: int = 1) -> SSASelection:
    """``selection``'s fixed slots (KV heads repeated ``repeat`` times) and ``top_k`` empty routed slots."""
    fixed = selection.block_idx[..., : selection.num_fixed_slots].repeat_interleave(repeat, dim=1)
    empty = torch.full((*fixed.shape[:3], top_k), -1, dtype=fixed.dtype, device=fixed.device)
    return SSASelection(torch.cat([fixed, empty], dim=-1).contiguous(), selection.block_size, fixed.shape[-1])


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--length", default="32k")
    parser.add_argument("--start", type=int, default=0, help="first token of the held-out window")
    parser.add_argument("--budgets", default="16,32,64,128,256")
    parser.add_argument("--max-queries", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    began = time.perf_counter()
    length = parse_length(args.length)
    budgets = [int(b) for b in args.budgets.split(",")]
    model = _load_model(args.model, args.device, "auto")
    ssa = model.config.ssa_config
    ids = load_split(args.corpus, "heldout")
    window = torch.from_numpy(np.asarray(ids[args.start : args.start + length], dtype=np.int64))[None]
    rows: dict[int, dict] = {}

    def capture(attn, original):
        def attend(q, k, v, summaries, route=None):
            out = original(q, k, v, summaries, route)
            with torch.no_grad():
                q_, k_ = q.detach(), k.detach()
                selection = attn.select(q_, k_, summaries, route)
                group = q_.shape[2] // k_.shape[2]
                rotary = (
                    None
                    if attn.config.position_scheme == "rope"
                    else (attn.rotary, ssa.sink_blocks, ssa.local_blocks)
                )
                row = {"layer": attn.layer_idx, "shared": {}, "per_head": {}}
                for top_k in budgets:
                    kw = dict(scale=attn.scale, max_queries=args.max_queries, local_rotary=rotary)
                    shared = oracle_recall(q_, k_, budget_selection(selection, top_k), **kw)
                    k_rep = k_.repeat_interleave(group, dim=2)
                    own = oracle_recall(q_, k_rep, budget_selection(selection, top_k, group), **kw)
                    row["shared"][top_k], row["per_head"][top_k] = float(shared), float(own)
                rows[attn.layer_idx] = row
                print(f"layer {attn.layer_idx}: {row}", flush=True)
            return out

        return attend

    for attn in _attention_modules(model):
        attn._attend_sparse = capture(attn, attn._attend_sparse)
    with torch.no_grad():
        model(input_ids=window.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    layers = [rows[i] for i in sorted(rows)]
    result = {
        "model": args.model, "corpus": args.corpus, "length": length, "start": args.start,
        "max_queries": args.max_queries, "budgets": budgets, "ssa": ssa.to_dict(), "layers": layers,
        "mean": {
            kind: {b: sum(r[kind][b] for r in layers) / len(layers) for b in budgets}
            for kind in ("shared", "per_head")
        },
        "torch": torch.__version__, "seconds": time.perf_counter() - began,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| layer | " + " | ".join(f"top_k {b} shared / per head" for b in budgets) + " |")
    print("|---:|" + "---:|" * len(budgets))
    for r in layers + [{"layer": "**mean**", **result["mean"]}]:
        cells = " | ".join(f"{r['shared'][b]:.3f} / {r['per_head'][b]:.3f}" for b in budgets)
        print(f"| {r['layer']} | {cells} |")


if __name__ == "__main__":
    main()
