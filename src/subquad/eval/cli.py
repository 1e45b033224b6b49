"""``subquad eval``: argument definitions and the entry the top-level CLI calls.

subquad eval --model PATH --suite ruler --lengths 4k,32k,128k --samples 20 --out runs/ruler
"""

from __future__ import annotations

import argparse
import sys

from subquad._args import key_values

from .runner import ATTENTIONS, SUITES, evaluate_path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``subquad eval`` options to ``parser``."""
    parser.add_argument("--model", required=True, metavar="PATH", help="saved transformers model directory")
    parser.add_argument("--suite", required=True, choices=SUITES, help="which evaluation to run")
    parser.add_argument(
        "--lengths",
        default="4k",
        help="comma-separated context lengths in tokens of the model's tokenizer; k = 1024, m = 1024*1024 "
        "(default: 4k)",
    )
    parser.add_argument("--samples", type=int, default=10, metavar="N", help="samples per task and length")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (results resume here)")
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated subset of the suite's tasks (ruler: niah_single_1,...,qa_2; "
        "mrcr: 2needle,4needle,8needle; niah: depths in percent, e.g. 0,25,50,75,100)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype (auto: as stored, float32 becomes bfloat16 on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call (default: 1)")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=65536,
        help="cap on batch_size x length, so long prompts run alone (default: 65536)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap on tokens generated per sample (default: per task; warns if shorter than an answer)",
    )
    parser.add_argument(
        "--ssa",
        default=None,
        help="SSA settings replacing the model's, e.g. summary=max,sub_block_size=4 or top_k=64 (or JSON)",
    )
    parser.add_argument(
        "--attention",
        default="saved",
        choices=ATTENTIONS,
        help="saved: as the model was saved; ssa: run a transformers model (Llama, Mistral, Qwen2, Qwen3, "
        "...) with SSA (default: saved)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``subquad eval`` with parsed ``args``; print the summary table. Returns the exit code."""
    try:
        ssa = key_values(args.ssa) if getattr(args, "ssa", None) else None
        summary = evaluate_path(
            args.model,
            device=args.device,
            dtype=args.dtype,
            ssa=ssa,
            attention=args.attention,
            suite=args.suite,
            lengths=args.lengths,
            num_samples=args.samples,
            out_dir=args.out,
            tasks=args.tasks,
            seed=args.seed,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_new_tokens=args.max_new_tokens,
            progress=not getattr(args, "no_progress", False),
        )
    except (ValueError, TypeError) as error:
        print(f"subquad eval: error: {error}", file=sys.stderr)
        return 2
    from .runner import summary_markdown

    print(summary_markdown(summary))
    print(f"results: {args.out}/results.jsonl, summary: {args.out}/summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m subquad.eval.cli``) until the top-level CLI wires ``subquad eval``."""
    parser = argparse.ArgumentParser(prog="subquad eval", description="Offline long-context evaluation.")
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
