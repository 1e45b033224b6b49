"""Held-out loss of a saved model: ``python -m subquad.train.heldout --model DIR --corpus DIR``.

The same windows as the trainer's periodic evals (:func:`subquad.train.trainer.evaluate_heldout`),
so a converted model is measured exactly as its dense twin was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from subquad.benchmark import parse_length

    parser = argparse.ArgumentParser(prog="python -m subquad.train.heldout", description=__doc__)
    parser.add_argument("--model", required=True, help="saved model directory")
    parser.add_argument("--corpus", required=True, help="corpus directory (heldout.bin)")
    parser.add_argument("--seq-len", default="32k", help="window length, e.g. 32k (default: 32k)")
    parser.add_argument("--tokens", default="1m", help="tokens evaluated, e.g. 1m (default: 1m)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--ssa", default=None,
        help="SSA settings replacing the model's, e.g. summary=max,sub_block_size=4 or top_k=64 (or JSON)",
    )  # fmt: skip
    parser.add_argument(
        "--full-budget", action="store_true",
        help="an SSA model's weights with every earlier block selected: dense attention with the model's "
        "positions (a learned router is dropped; a coarse_span model keeps its coarse term)",
    )  # fmt: skip
    parser.add_argument(
        "--by-position", default=None, metavar="EDGES",
        help="also the loss between these positions of the window, e.g. 1k,4k,16k",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    import torch

    from subquad._args import key_values
    from subquad.eval.runner import override_ssa
    from subquad.models import SubquadConfig, SubquadForCausalLM
    from subquad.train.trainer import _resolve_device, evaluate_heldout, heldout_loss_by_position

    try:
        seq_len, num_tokens = parse_length(args.seq_len), parse_length(args.tokens)
        edges = [parse_length(e) for e in args.by_position.split(",")] if args.by_position else None
        if not Path(args.model, "config.json").is_file():
            raise ValueError(
                f"--model {args.model!r}: no config.json there (expected a saved model directory)"
            )
        device = _resolve_device(args.device)
        config = SubquadConfig.from_pretrained(args.model)
        ssa = key_values(args.ssa) if args.ssa else None
        override_ssa(config, ssa, args.model)
        if args.full_budget:
            if config.attention != "ssa" or ssa:
                raise ValueError("--full-budget: expected an SSA model and no --ssa (it selects every block)")
            # Dense attention with the model's position scheme is SSA with every block selected
            # (local_rope: the same rotary window); the routing weights have nothing left to do.
            config.attention, config.router = "dense", "shared"
        model = SubquadForCausalLM.from_pretrained(args.model, config=config, dtype=torch.float32)
        model = model.to(device)
        if edges is None:
            loss, spans = evaluate_heldout(model, args.corpus, seq_len, num_tokens, device), None
        else:
            spans = heldout_loss_by_position(model, args.corpus, seq_len, num_tokens, device, edges)
            loss = sum(s["loss"] * s["tokens"] for s in spans) / sum(s["tokens"] for s in spans)
    except (ValueError, TypeError) as exc:  # a bad --ssa JSON is a ValueError too
        print(f"subquad heldout: {exc}", file=sys.stderr)
        return 2
    result = {"model": args.model, "corpus": args.corpus, "seq_len": seq_len, "tokens": num_tokens,
              "heldout_loss": loss, "attention": model.config.attention}  # fmt: skip
    if model.config.attention == "ssa":
        result["ssa"] = model.config.ssa  # the routing measured, overrides included
    if args.full_budget:
        result["full_budget"] = True
    if spans is not None:
        result["by_position"] = spans
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
