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
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    import torch

    from subquad.models import SubquadForCausalLM
    from subquad.train.trainer import _resolve_device, evaluate_heldout

    try:
        seq_len, num_tokens = parse_length(args.seq_len), parse_length(args.tokens)
        if not Path(args.model, "config.json").is_file():
            raise ValueError(
                f"--model {args.model!r}: no config.json there (expected a saved model directory)"
            )
        device = _resolve_device(args.device)
        model = SubquadForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
        loss = evaluate_heldout(model, args.corpus, seq_len, num_tokens, device)
    except ValueError as exc:
        print(f"subquad heldout: {exc}", file=sys.stderr)
        return 2
    result = {"model": args.model, "corpus": args.corpus, "seq_len": seq_len, "tokens": num_tokens,
              "heldout_loss": loss, "attention": model.config.attention}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
