"""Paired comparison of two eval runs: ``python -m subquad.eval.compare RUN_A RUN_B [--out FILE]``.

A run is a ``subquad eval`` output directory (or its ``results.jsonl``). Only prompts both runs
answered count: the same suite, task, length, seed and index, which is the same prompt when the two
models share a tokenizer (checked through the prompts' token counts). For each length it gives both
suite averages (the mean over tasks of each task's mean score, as ``summary.json`` does) and the
difference A - B with its standard error. Pairing removes the prompts' own difficulty from the
noise: each task's mean difference has variance ``s^2 / n`` over its prompts, and the average's
variance is the sum of those over the number of tasks squared. A target such as "no more than one
point below the twin" can then be read against that error rather than against two separate ones.

Rows record the answer cap they ran under (``max_new_tokens``); shared prompts whose caps differ are
counted and named in the table, since a shorter cap can cut off a correct answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._core import format_length

__all__ = ["compare_runs", "comparison_markdown", "load_results"]


def load_results(run: str | Path) -> dict[str, dict]:
    """The finished samples of ``run`` (an eval output directory or a results.jsonl), by sample id."""
    path = Path(run)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"run {str(run)!r}: no results.jsonl there (expected a `subquad eval` output)")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a run still writing: its last line is not finished
    records = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["id"]] = record
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} line {number}: not an eval result record ({error})") from error
    return records


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """Paired scores of two runs per length: ``{"lengths": {"32768": {...}}, "prompts": n}``.

    Each length holds ``a`` and ``b`` (suite averages in percent over the shared prompts),
    ``difference`` (a - b), ``stderr`` (of the difference), ``prompts`` and ``tasks`` (per task:
    ``a``, ``b``, ``n``). ``cap_mismatches``: ``{"A cap -> B cap": prompts}`` for the shared prompts
    whose rows both record an answer cap and differ (rows written before caps were recorded count as
    unknown, not as a mismatch). Raises ValueError when the runs share no prompt or show one prompt
    with two token counts (different tokenizers or generators).
    """
    a, b = load_results(run_a), load_results(run_b)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(
            f"runs {str(run_a)!r} and {str(run_b)!r} share no prompt (suite, task, length, seed, index)"
        )
    # (length, task) -> per-prompt (score a, score b) in percent
    pairs: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    cap_mismatches: dict[str, int] = defaultdict(int)
    for sample in shared:
        ra, rb = a[sample], b[sample]
        cap_a, cap_b = ra.get("max_new_tokens"), rb.get("max_new_tokens")
        if cap_a is not None and cap_b is not None and cap_a != cap_b:
            cap_mismatches[f"{cap_a} -> {cap_b}"] += 1
        if ra.get("prompt_tokens") != rb.get("prompt_tokens"):
            raise ValueError(
                f"prompt {sample!r}: {ra.get('prompt_tokens')} tokens in run A, {rb.get('prompt_tokens')} in "
                "run B; expected the same prompt (same tokenizer and prompt generator)"
            )
        pairs[ra["length"]][ra["task"]].append((100 * ra["score"], 100 * rb["score"]))
    lengths = {}
    for length in sorted(pairs):
        tasks, variance, sum_a, sum_b = {}, 0.0, 0.0, 0.0
        for task, scores in pairs[length].items():
            n = len(scores)
            mean_a, mean_b = sum(s[0] for s in scores) / n, sum(s[1] for s in scores) / n
            diffs = [s[0] - s[1] for s in scores]
            mean_d = mean_a - mean_b
            # A task with one prompt has no spread to estimate: it adds nothing, and says so by n.
            if n > 1:
                variance += sum((d - mean_d) ** 2 for d in diffs) / (n - 1) / n
            tasks[task] = {"a": round(mean_a, 2), "b": round(mean_b, 2), "n": n}
            sum_a, sum_b = sum_a + mean_a, sum_b + mean_b
        count = len(tasks)
        avg_a, avg_b = sum_a / count, sum_b / count
        lengths[str(length)] = {
            "a": round(avg_a, 2),
            "b": round(avg_b, 2),
            "difference": round(avg_a - avg_b, 2),
            "stderr": round(math.sqrt(variance) / count, 2),
            "prompts": sum(t["n"] for t in tasks.values()),
            "tasks": tasks,
        }
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "prompts": len(shared),
        "cap_mismatches": dict(cap_mismatches),
        "lengths": lengths,
    }


def comparison_markdown(result: dict[str, Any]) -> str:
    """Per length and task: A, B, A - B; each length's average row with the difference's error."""
    lines = [f"A: `{result['run_a']}`; B: `{result['run_b']}`; {result['prompts']} shared prompts.", ""]
    mismatches = result.get("cap_mismatches") or {}
    if mismatches:
        caps = ", ".join(f"{n} at {caps}" for caps, n in mismatches.items())
        lines += [
            f"**Answer caps differ** (max_new_tokens, A -> B: {caps}): a shorter cap can cut off a "
            "correct answer, so those pairs may differ for that reason alone.",
            "",
        ]
    lines += [
        "| length | task | prompts | A | B | A - B |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for length, row in result["lengths"].items():
        name = format_length(int(length))
        for task, t in row["tasks"].items():
            lines.append(
                f"| {name} | {task} | {t['n']} | {t['a']:.1f} | {t['b']:.1f} | {t['a'] - t['b']:+.1f} |"
            )
        lines.append(
            f"| {name} | **average** | {row['prompts']} | **{row['a']:.2f}** | **{row['b']:.2f}** | "
            f"**{row['difference']:+.2f} ± {row['stderr']:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m subquad.eval.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_a", help="eval output directory (or results.jsonl) of model A")
    parser.add_argument("run_b", help="the same for model B")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the comparison as JSON")
    args = parser.parse_args(argv)
    try:
        result = compare_runs(args.run_a, args.run_b)
    except ValueError as error:
        print(f"subquad compare: error: {error}", file=sys.stderr)
        return 2
    print(comparison_markdown(result), end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
