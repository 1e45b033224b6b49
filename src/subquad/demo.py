"""``subquad demo``: needles hidden in long haystacks, found by a trained Subquad model.

The demo loads a model directory (by default the ``subquad-nano`` checkpoint shipped inside the
package), runs the needle-in-a-haystack grid of :mod:`subquad.eval.niah` through
:func:`subquad.eval.runner.evaluate` (one prompt per depth and length, greedy decoding, RULER's
scoring), and reports per length: accuracy, mean seconds per sample (prompt tokenization, prefill
and generation), and the share of (query, key) pairs SSA attends compared with dense causal
attention at that length. It writes the heatmap (``niah_heatmap.png``), the per-sample results and
``demo.json`` to the output directory.

Example::

    from subquad import demo
    model, tokenizer = demo.load(demo.default_model_path(), device="cpu")
    result = demo.run(model, tokenizer, lengths=[4096, 16384], depths=[10, 50, 90], out_dir="runs/demo")
    print(demo.format_table(result))
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from subquad.eval import runner
from subquad.eval._core import format_length, parse_length
from subquad.eval.runner import ssa_config_of
from subquad.ops.ssa.config import SSAConfig

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_MAX_LENGTH",
    "LADDER",
    "MAX_NEW_TOKENS",
    "default_model_path",
    "demo_lengths",
    "format_table",
    "key_share",
    "load",
    "parse_depths",
    "run",
    "selected_pairs",
]

# The lengths a demo walks up, cut at --max-length: the CPU default stops at 64K, a GPU run at 12M.
LADDER: tuple[int, ...] = tuple(
    parse_length(n) for n in ("4k", "16k", "64k", "256k", "1m", "2m", "4m", "12m")
)
DEFAULT_MAX_LENGTH = parse_length("64k")
# Needle depths in percent. 0% would sit in the sink block and 100% in the local window, which every
# token sees anyway; mid-document needs the router to find the needle. One depth keeps the CPU default
# (4k, 16k, 64k) under 3 minutes on 2 cores; pass --depths 10,50,90 for a fuller heatmap.
DEFAULT_DEPTHS: tuple[int, ...] = (50,)
# The answer is a 7-digit number: a dozen tokens hold it in any reasonable tokenizer.
MAX_NEW_TOKENS = 12


def default_model_path() -> Path:
    """Where the shipped ``subquad-nano`` checkpoint lives: ``subquad/assets/subquad-nano/``."""
    return Path(os.fspath(resources.files("subquad") / "assets" / "subquad-nano"))


def demo_lengths(max_length: int) -> list[int]:
    """The ladder (4K, 16K, 64K, 256K, 1M, 2M, 4M, 12M) up to ``max_length``, which is always included."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
    return sorted({n for n in LADDER if n < max_length} | {max_length})


def parse_depths(spec: str | Sequence[int]) -> list[int]:
    """``"10,50,90"`` (or a list of ints) -> sorted unique needle depths, whole percents in 0..100."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    depths = set()
    for item in items:
        text = str(item).strip()
        if not text and isinstance(item, str):
            continue
        if isinstance(item, bool) or not text.isdigit() or int(text) > 100:
            raise ValueError(f"depth {item!r} is not a whole percent from 0 to 100")
        depths.add(int(text))
    if not depths:
        raise ValueError(f"depths {spec!r} name no depth")
    return sorted(depths)


def selected_pairs(ssa: SSAConfig, length: int) -> int:
    """(query, key) pairs SSA attends in one causal pass over ``length`` tokens (per KV head).

    Counted block by block from the config, the same count as ``SSASelection.num_selected_keys(length,
    causal=True).sum()`` of a selection with every routed slot filled (the flat router fills all of
    them whenever enough earlier blocks exist; the tree router may leave some empty, so for it this is
    an upper bound): the token's own block up to the token, the earlier local blocks, the sink blocks
    outside the local window, and ``min(top_k, candidates)`` routed blocks, all complete.
    """
    import numpy as np

    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")
    size = ssa.block_size
    block = np.arange(-(-length // size), dtype=np.int64)
    queries = np.minimum(size, length - block * size)
    window_start = block - ssa.local_blocks + 1
    earlier_local = np.minimum(ssa.local_blocks - 1, block)
    sinks = np.clip(np.minimum(ssa.sink_blocks, window_start), 0, None)
    routed = np.minimum(ssa.top_k, np.clip(window_start - ssa.sink_blocks, 0, None))
    own = queries * (queries + 1) // 2
    return int((own + queries * size * (earlier_local + sinks + routed)).sum())


def key_share(config: Any, length: int) -> float:
    """Attended (query, key) pairs over dense causal attention's ``length * (length + 1) / 2``."""
    ssa = config if isinstance(config, SSAConfig) else ssa_config_of(config)
    if ssa is None:
        return 1.0
    return selected_pairs(ssa, length) / (length * (length + 1) / 2)


def load(
    path: str | os.PathLike,
    device: str = "cpu",
    attention: str = "saved",
    ssa: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Model and tokenizer from a transformers directory: float32 on the CPU, bfloat16 on CUDA.
    ``attention="ssa"`` runs another transformers model with SSA (:func:`runner.load_causal_lm`);
    ``ssa``: SSAConfig fields replacing the saved ones (e.g. ``{"top_k": 8}``)."""
    dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return runner.load_model(path, device=device, dtype=dtype, ssa=ssa, attention=attention)


def run(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[int] = DEFAULT_DEPTHS,
    out_dir: str | os.PathLike = "runs/demo",
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """One needle per depth and length; returns (and writes to ``out_dir/demo.json``) the results.

    Every run starts afresh: the previous run's per-sample results in ``out_dir`` are replaced.
    """
    depths = parse_depths(depths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # evaluate() resumes from results.jsonl; a demo measures, so it never reuses an earlier run's samples.
    (out / "results.jsonl").unlink(missing_ok=True)
    name = model_name or type(model).__name__
    start = time.perf_counter()
    summary = runner.evaluate(
        model,
        tokenizer,
        suite="niah",
        lengths=list(lengths),
        num_samples=1,
        out_dir=out,
        tasks=[str(d) for d in depths],
        seed=seed,
        max_new_tokens=max_new_tokens,
        model_name=name,
        progress=progress,
    )
    total = time.perf_counter() - start
    records = [
        json.loads(line)
        for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    config = model.config
    ssa = ssa_config_of(config)
    rows = []
    for length in summary["lengths"]:
        done = [r for r in records if r["length"] == length]
        pairs = selected_pairs(ssa, length) if ssa is not None else length * (length + 1) // 2
        rows.append(
            {
                "length": length,
                "samples": len(done),
                "correct": sum(r["score"] for r in done),
                "accuracy": sum(r["score"] for r in done) / len(done),
                "seconds_per_sample": sum(r["seconds"] for r in done) / len(done),
                "keys_per_query": pairs / length,
                "key_share": pairs / (length * (length + 1) / 2),
            }
        )
    import torch

    result = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention": "ssa" if ssa is not None else "dense",
        "ssa": ssa.to_dict() if ssa is not None else None,
        "position_scheme": getattr(config, "position_scheme", None),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "lengths": summary["lengths"],
        "depths": depths,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "rows": rows,
        "samples": [
            {
                "length": r["length"],
                "depth": r["meta"]["depth"],
                "score": r["score"],
                "prediction": r["prediction"],
                "answer": r["answers"][0],
                "prompt_tokens": r["prompt_tokens"],
                "seconds": r["seconds"],
            }
            for r in records
        ],
        "heatmap": summary.get("heatmap"),
        "total_seconds": round(total, 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["json"] = str(out / "demo.json")
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_table(result: dict[str, Any]) -> str:
    """One row per length: accuracy, seconds per sample, keys per query and their share of dense."""
    rows = [
        "| length | accuracy | s / sample | keys / query | keys attended vs dense |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        rows.append(
            f"| {format_length(row['length'])} | {100 * row['accuracy']:.0f}% "
            f"({row['correct']:g}/{row['samples']}) | {row['seconds_per_sample']:.2f} | "
            f"{row['keys_per_query']:,.0f} | {_percent(row['key_share'])} |"
        )
    return "\n".join(rows)


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%" if share < 0.1 else f"{100 * share:.1f}%"
