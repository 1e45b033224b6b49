"""``subquad train``: flags mirroring :class:`subquad.train.trainer.TrainConfig`.

GPU, SSA ``nano`` in 9-minute jobs (rerun the same line to resume until ``final/`` exists)::

    PYTHONPATH=src python -m subquad.train.cli --corpus data/corpus --out runs/nano-ssa --flavor nano \\
        --steps 3000 --tokens-per-step 131072 --seq-len-schedule 0:1024,1500:4096,2500:16384 \\
        --max-minutes 9 --device cuda --compile

Dense twin: the same line with ``--attention dense --out runs/nano-dense``. Convert it to SSA
(and optionally fine-tune)::

    python -m subquad.train.cli --convert-from runs/nano-dense/final --out runs/nano-converted
    python -m subquad.train.cli --convert-from runs/nano-dense/final --out runs/nano-converted \\
        --corpus data/corpus --steps 150 --lr 3e-4 --warmup-steps 10 ...
"""

from __future__ import annotations

import argparse
import json
import sys

from subquad._args import key_values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``subquad train`` flags to ``parser``."""
    p = parser
    p.add_argument(
        "--corpus", default=None, help="corpus directory (meta.json, train.bin, heldout.bin, tokenizer/)"
    )
    p.add_argument("--out", required=True, help="run directory; rerunning with the same one resumes")
    p.add_argument("--flavor", default="nano", help="model size: debug, nano, small")
    p.add_argument(
        "--attention", default=None, choices=["ssa", "dense"], help="ssa (default) or the dense twin"
    )
    p.add_argument("--position-scheme", default=None, choices=["rope", "local_rope"],
                   help="default: the model's (local_rope for ssa, rope for dense)")  # fmt: skip
    p.add_argument("--ssa", default=None, help="SSA settings, e.g. top_k=16,block_size=64 (or JSON)")
    p.add_argument("--model-override", default=None, help="other model fields, e.g. num_hidden_layers=4")
    p.add_argument("--init-from", default=None, help="model directory to initialise the weights from")
    p.add_argument("--convert-from", default=None,
                   help="dense model directory: write it as SSA to OUT/converted (then fine-tune it when "
                        "--corpus and --steps > 0 are given)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--tokens-per-step", type=int, default=131072)
    p.add_argument(
        "--micro-batch-tokens", type=int, default=None, help="tokens per forward (grad accumulation)"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--betas", default="0.9,0.95")
    p.add_argument("--seq-len-schedule", default="0:512", help="curriculum step:seq_len,..., up to 32768")
    p.add_argument("--skills-fraction", type=float, default=0.0, help="share of windows from skills.bin")
    p.add_argument("--answer-weight", type=float, default=0.0,
                   help="skill answer tokens count 1 + this in the loss (0 = plain loss)")  # fmt: skip
    p.add_argument("--routing-loss", type=float, default=0.0,
                   help="router loss weight (SSA: KL, dense block mass vs routing; 0 = off)")  # fmt: skip
    p.add_argument("--routing-loss-queries", type=int, default=64, help="query rows per sequence for it")
    p.add_argument("--routing-loss-temperature", type=float, default=1.0,
                   help="< 1 sharpens the router loss's target towards its heaviest blocks")  # fmt: skip
    p.add_argument("--recall-loss", type=float, default=0.0,
                   help="recall loss weight (SSA: -log share of dense attention mass on the selected keys; "
                        "0 = off)")  # fmt: skip
    p.add_argument("--recall-loss-queries", type=int, default=64, help="query rows per sequence for it")
    p.add_argument("--train-only", default="all", choices=["all", "router"],
                   help="router: train only a learned router, the model frozen")  # fmt: skip
    p.add_argument(
        "--eval-interval", type=int, default=250, help="steps between held-out evals (0: end only)"
    )
    p.add_argument("--eval-tokens", type=int, default=262144)
    p.add_argument("--checkpoint-interval", type=int, default=250)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) before this")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--peak-flops", type=float, default=None, help="MFU denominator (default 989e12 on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    """Run ``subquad train`` from parsed arguments; 0 on success, 2 on a bad argument."""
    from subquad.train.trainer import TrainConfig, convert_dense_to_ssa, train

    try:
        ssa = key_values(args.ssa) if args.ssa else None
        overrides = key_values(args.model_override) if args.model_override else {}
        betas = tuple(float(b) for b in args.betas.split(","))
        init_from = args.init_from
        if args.convert_from:
            if init_from:
                raise ValueError("--convert-from and --init-from: give one of them")
            converted = convert_dense_to_ssa(args.convert_from, f"{args.out}/converted", ssa=ssa)
            print(f"converted {args.convert_from} -> {converted} (attention='ssa', same weights)")
            if args.corpus is None or args.steps <= 0:
                return 0
            init_from, ssa = converted, None
        if args.corpus is None:
            raise ValueError("--corpus: required to train (only --convert-from works without it)")
        config = TrainConfig(
            corpus=args.corpus, out_dir=args.out, flavor=args.flavor, attention=args.attention,
            position_scheme=args.position_scheme, ssa=ssa, model_overrides=overrides, init_from=init_from,
            seed=args.seed, tokens_per_step=args.tokens_per_step, micro_batch_tokens=args.micro_batch_tokens,
            lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, steps=args.steps,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, betas=betas,
            seq_len_schedule=args.seq_len_schedule, skills_fraction=args.skills_fraction,
            answer_weight=args.answer_weight, routing_loss=args.routing_loss,
            routing_loss_queries=args.routing_loss_queries,
            routing_loss_temperature=args.routing_loss_temperature, recall_loss=args.recall_loss,
            recall_loss_queries=args.recall_loss_queries, train_only=args.train_only,
            eval_interval=args.eval_interval, eval_tokens=args.eval_tokens,
            checkpoint_interval=args.checkpoint_interval, log_interval=args.log_interval,
            max_minutes=args.max_minutes, compile=args.compile, dtype=args.dtype, device=args.device,
            peak_flops=args.peak_flops, progress=not args.no_progress,
        )  # fmt: skip
        summary = train(config)
    except (ValueError, TypeError) as exc:
        print(f"subquad train: {exc}", file=sys.stderr)
        return 2
    state = "done" if summary["completed"] else f"stopped at step {summary['steps']}/{summary['total_steps']}"
    print(json.dumps(summary, indent=2))
    print(f"subquad train: {state}" + ("" if summary["completed"] else " (rerun the same command to resume)"))
    return 0


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """``subquad corpus``: build a tokenized corpus (and optionally skill data) for ``subquad train``."""
    parser.add_argument("--source", action="append", required=True, help="a directory to read (repeatable)")
    parser.add_argument("--out", required=True, help="corpus directory to write")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "bytes"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--tokenizer-from", default=None, help="reuse this directory's tokenizer.json (e.g. a model's)"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.01)
    parser.add_argument("--max-mb", type=float, default=None, help="cap on source text, in MB (sampled)")
    parser.add_argument(
        "--skills-tokens",
        type=int,
        default=0,
        help="also write skills.bin with this many tokens of skill documents (the trainer mixes them in)",
    )
    parser.add_argument(
        "--skills-kinds", default=None, help="skill kind weights, e.g. facts=2,recall=1 (default: all equal)"
    )
    parser.add_argument(
        "--skills-doc-tokens",
        default="256,8192",
        help="LOW,HIGH: skill document lengths in tokens, log-uniform (default 256,8192)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skills-prose",
        type=float,
        default=0.0,
        help="share of facts documents whose haystack is English prose from the corpus (default 0)",
    )
    parser.add_argument(
        "--skills-seed",
        type=int,
        default=None,
        help="seed of the skill documents alone (default: --seed); the corpus and its split stay the same",
    )


def _kind_weights(text: str) -> dict[str, float]:
    weights = key_values(text)
    if not weights or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights.values()
    ):
        raise ValueError(f"--skills-kinds={text!r}: expected kind=weight pairs with positive weights")
    return {kind: float(w) for kind, w in weights.items()}


def _doc_tokens(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 0 < int(parts[0]) <= int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise ValueError(f"--skills-doc-tokens={text!r}: expected token counts LOW,HIGH with 0 < LOW <= HIGH")


def run_corpus(args: argparse.Namespace) -> int:
    from subquad.train.data import build_corpus
    from subquad.train.skills import write_skill_mixture

    try:
        # Parsed first: a typo must not surface after minutes of corpus building.
        weights = _kind_weights(args.skills_kinds) if args.skills_kinds else None
        doc_tokens = _doc_tokens(args.skills_doc_tokens)
        max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
        meta = build_corpus(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            heldout_fraction=args.heldout_fraction,
            max_bytes=max_bytes,
            seed=args.seed,
            tokenizer_from=args.tokenizer_from,
        )
        if args.skills_tokens:
            # The trainer draws its own share of batches from skills.bin: keep the file all skills.
            write_skill_mixture(
                args.out,
                args.skills_tokens,
                skill_fraction=1.0,
                kind_weights=weights,
                doc_tokens=doc_tokens,
                seed=args.seed if args.skills_seed is None else args.skills_seed,
                prose_share=args.skills_prose,
            )
    except (ValueError, TypeError) as exc:
        print(f"subquad corpus: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("vocab_size", "tokens", "bytes_per_token")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subquad train", description="train a Subquad model")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
