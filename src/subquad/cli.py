"""The ``subquad`` command line: ``bench`` (attention benchmark), ``eval`` (long-context suites),
``corpus`` (training data) and ``train`` (training and dense-to-SSA conversion)."""

from __future__ import annotations

import argparse
import sys

from subquad.eval.cli import add_eval_arguments, run_eval
from subquad.train.cli import add_corpus_arguments, add_train_arguments, run_corpus, run_train


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time SSA against dense attention (CPU: small lengths; GPU: full sweep)")
    p.add_argument("--shape", default="layer-8b", choices=["layer-8b", "long"], help="attention layer shape")
    p.add_argument(
        "--lengths", default=None, help="comma-separated lengths, e.g. 16k,128k,1m (default per device)"
    )
    p.add_argument("--top-k", default="16", help="comma-separated routed-block budgets, e.g. 16,64,240")
    p.add_argument("--index", default="flat", choices=["flat", "tree"], help="router")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dense-max-len", default="128k", help="longest length at which dense runs (0: never)")
    p.add_argument(
        "--flex-max-len", default="16k", help="longest length at which FlexAttention runs (0: never)"
    )
    p.add_argument(
        "--backward-max-len", default="128k", help="longest length timed forward+backward (0: never)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds after which lengths are skipped")
    p.add_argument("--out", default="benchmarks/results", help="directory for JSON, markdown and PNG")
    p.add_argument("--tag", default=None, help="file name stem for the results")
    p.add_argument(
        "--routing", action="store_true", help="compare the flat router and the tree index instead"
    )


def _run_bench(args: argparse.Namespace) -> int:
    from subquad.benchmark import markdown_table, parse_length, run_benchmark, run_routing_benchmark

    try:
        lengths = [parse_length(x) for x in args.lengths.split(",")] if args.lengths else None
        top_ks = tuple(int(x) for x in args.top_k.split(","))
        limits = {
            name: _max_len(getattr(args, name))
            for name in ("dense_max_len", "flex_max_len", "backward_max_len")
        }
    except ValueError as exc:
        raise SystemExit(
            f"subquad bench: bad argument: {exc} (e.g. --lengths 16k,1m --top-k 16,64)"
        ) from None
    if any(k < 0 for k in top_ks):
        raise SystemExit(f"subquad bench: --top-k {args.top_k!r}: expected non-negative integers")
    if args.routing:
        run_routing_benchmark(
            lengths,
            shape=args.shape,
            top_k=top_ks[0],
            device=args.device,
            reps=args.reps,
            out_dir=args.out,
            tag=args.tag,
        )
        return 0
    result = run_benchmark(
        shape=args.shape,
        lengths=lengths,
        top_ks=top_ks,
        index=args.index,
        device=args.device,
        **limits,
        reps=args.reps,
        time_budget_s=args.time_budget,
        out_dir=args.out,
        tag=args.tag,
    )
    print(markdown_table(result))
    return 0


def _max_len(text: str) -> int:
    """A length limit; ``0`` turns the measurement off."""
    from subquad.benchmark import parse_length

    return 0 if text.strip() == "0" else parse_length(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subquad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    add_eval_arguments(sub.add_parser("eval", help="run RULER-, MRCR- or needle-style evaluations"))
    add_corpus_arguments(sub.add_parser("corpus", help="build a tokenized training corpus from local files"))
    add_train_arguments(sub.add_parser("train", help="train a Subquad model, or convert a dense twin"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "corpus":
        return run_corpus(args)
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
