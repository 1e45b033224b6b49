"""The ``subquad`` command line: ``demo`` (needles in long haystacks with a trained model), ``bench``
(attention benchmark), ``eval`` (long-context suites), ``corpus`` (training data) and ``train``
(training and dense-to-SSA conversion)."""

from __future__ import annotations

import argparse
import sys

from subquad._args import key_values
from subquad.eval.cli import add_eval_arguments, run_eval
from subquad.eval.runner import ATTENTIONS
from subquad.ops.ssa.config import INDEXES
from subquad.train.cli import add_corpus_arguments, add_train_arguments, run_corpus, run_train


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time SSA against dense attention (CPU: small lengths; GPU: full sweep)")
    p.add_argument("--shape", default="layer-8b", choices=["layer-8b", "long"], help="attention layer shape")
    p.add_argument(
        "--lengths", default=None, help="comma-separated lengths, e.g. 16k,128k,1m (default per device)"
    )
    p.add_argument("--top-k", default="16", help="comma-separated routed-block budgets, e.g. 16,64,240")
    p.add_argument("--index", default="flat", choices=INDEXES, help="router")
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
        "--routing", action="store_true", help="compare the flat router and the sub-linear indexes instead"
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="find needles in 4K-64K token haystacks with the shipped model (GPU: up to 12M tokens)",
        description="Hide a needle in haystacks of several lengths and depths, let a trained Subquad "
        "model answer, and print accuracy, seconds per sample and the share of keys SSA attends per "
        "length. Writes a heatmap and demo.json to --out.",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="transformers model directory with its tokenizer (default: the shipped subquad-nano)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--lengths", default=None, help="comma-separated context lengths in tokens, e.g. 4k,16k,1m"
    )
    group.add_argument(
        "--max-length",
        default="64k",
        help="longest length of the ladder 4k,16k,64k,256k,1m,2m,4m,12m to run (default: 64k)",
    )
    p.add_argument("--depths", default=None, help="needle depths in percent, e.g. 10,50,90 (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    p.add_argument(
        "--attention",
        default="saved",
        choices=ATTENTIONS,
        help="saved: as the model was saved; ssa: run a transformers --model (Llama, Mistral, Qwen2, "
        "Qwen3, ...) with SSA (default: saved)",
    )
    p.add_argument(
        "--ssa",
        default=None,
        help="SSA settings replacing the model's, e.g. top_k=8 (past 128K the shipped model finds more "
        "needles with 8 routed blocks than with its 16) or JSON",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from subquad import demo
    from subquad.eval._core import format_length, parse_length, parse_lengths
    from subquad.eval.runner import ssa_config_of

    def fail(message: str) -> int:
        print(f"subquad demo: error: {message}", file=sys.stderr)
        return 2

    try:
        lengths = parse_lengths(args.lengths) if args.lengths is not None else None
    except ValueError as exc:
        return fail(f"--lengths {args.lengths!r}: {exc}")
    if lengths is None:
        try:
            lengths = demo.demo_lengths(parse_length(args.max_length))
        except ValueError as exc:
            return fail(f"--max-length {args.max_length!r}: {exc}")
    try:
        depths = demo.parse_depths(args.depths) if args.depths is not None else list(demo.DEFAULT_DEPTHS)
    except ValueError as exc:
        return fail(f"--depths {args.depths!r}: {exc} (e.g. --depths 10,50,90)")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        return fail(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {args.device!r}: CUDA is not available here")
    path = Path(args.model) if args.model is not None else demo.default_model_path()
    if not (path / "config.json").is_file():
        if args.model is None:
            return fail(
                f"no model at {path} (the shipped subquad-nano checkpoint is not installed); "
                "--model PATH can point to another model directory"
            )
        return fail(f"--model {args.model!r}: not a model directory (no config.json there)")
    try:
        ssa_override = key_values(args.ssa) if args.ssa is not None else None
    except ValueError as exc:
        return fail(f"--ssa {args.ssa!r}: {exc} (e.g. --ssa top_k=8)")
    try:
        model, tokenizer = demo.load(path, device=args.device, attention=args.attention, ssa=ssa_override)
    except (OSError, ValueError, TypeError) as exc:
        with_ssa = f" with --ssa {args.ssa!r}" if ssa_override else ""
        return fail(f"could not load the model at {path}{with_ssa}: {exc}")
    ssa = ssa_config_of(model.config)
    attention = (
        f"SSA (block {ssa.block_size}, {ssa.sink_blocks} sink + {ssa.local_blocks} local + {ssa.top_k} "
        f"routed blocks)"
        if ssa is not None
        else "dense attention"
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"subquad demo: {path.name} ({params / 1e6:.1f}M parameters, {attention}) on {args.device}; "
        f"{len(depths)} needle depth{'s' * (len(depths) > 1)} x "
        f"{len(lengths)} length{'s' * (len(lengths) > 1)} "
        f"({', '.join(format_length(n) for n in lengths)})",
        flush=True,
    )
    try:
        result = demo.run(
            model,
            tokenizer,
            lengths=lengths,
            depths=depths,
            out_dir=args.out,
            seed=args.seed,
            max_new_tokens=demo.MAX_NEW_TOKENS,
            progress=not args.no_progress,
            model_name=path.name,
        )
    except (ValueError, TypeError) as exc:
        return fail(str(exc))
    print(demo.format_table(result))
    print(f"total {result['total_seconds']:.0f} s; heatmap: {result['heatmap']}, results: {result['json']}")
    return 0


def _max_len(text: str) -> int:
    """A length limit; ``0`` turns the measurement off."""
    from subquad.benchmark import parse_length

    return 0 if text.strip() == "0" else parse_length(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subquad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    add_eval_arguments(sub.add_parser("eval", help="run RULER-, MRCR- or needle-style evaluations"))
    add_corpus_arguments(sub.add_parser("corpus", help="build a tokenized training corpus from local files"))
    add_train_arguments(sub.add_parser("train", help="train a Subquad model, or convert a dense twin"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "corpus":
        return run_corpus(args)
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
