"""Needle in a haystack: a depth x length grid of single-needle retrieval, and its heatmap.

One needle (RULER's format, ``One of the special magic numbers for {key} is: {value}.``, a random
adjective-noun key and a 7-digit value) is placed in the essay haystack at a chosen depth: 0% puts it
before the first sentence, 100% after the last, in between at the sentence boundary that fraction of
the way through. The question and answer prefix are RULER's niah_single_2 template. A cell of the grid
is the mean score (share of samples whose output contains the value) at one depth and one length.

Example::

    from subquad.eval import niah
    samples = niah.generate(32768, 50, tokenizer, num_samples=5, seed=0)
    niah.save_heatmap({(50, 32768): 1.0, (0, 32768): 0.8}, "heatmap.png")
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._core import (
    Built,
    Sample,
    check_int,
    check_tokenizer,
    essay_haystack,
    fit_haystack,
    format_length,
    sample_chain,
    sample_rng,
    string_match_all,
)
from .ruler import _NIAH_NEEDLE, _niah_template, _random_needle_part

__all__ = [
    "DEFAULT_DEPTHS",
    "MAX_NEW_TOKENS",
    "TASKS",
    "depth_of",
    "generate",
    "iter_samples",
    "save_heatmap",
    "score",
]

DEFAULT_DEPTHS: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
# The runner names a depth like a task, so that results share one layout across suites.
TASKS: tuple[str, ...] = tuple(f"depth_{d}" for d in DEFAULT_DEPTHS)
MAX_NEW_TOKENS = 32


def depth_of(task: str) -> int:
    """``"depth_50"`` -> 50."""
    match = re.fullmatch(r"depth_(\d+)", str(task))
    if not match or int(match.group(1)) > 100:
        raise ValueError(f"niah task {task!r} must be 'depth_<percent>' with a percent in 0..100")
    return int(match.group(1))


def _check_depth(depth_percent: Any) -> float:
    if isinstance(depth_percent, bool) or not isinstance(depth_percent, (int, float)):
        raise TypeError(f"depth_percent must be a number in [0, 100], got {depth_percent!r}")
    if not 0 <= depth_percent <= 100:
        raise ValueError(f"depth_percent must be in [0, 100], got {depth_percent}")
    return float(depth_percent)


def generate(
    length: int, depth_percent: float, tokenizer: Any, num_samples: int, seed: int = 0
) -> list[Sample]:
    """``num_samples`` single-needle prompts of ``length`` tokens with the needle at ``depth_percent``."""
    check_int("num_samples", num_samples, 0)
    return list(iter_samples(length, depth_percent, tokenizer, seed, stop=num_samples))


def iter_samples(
    length: int,
    depth_percent: float,
    tokenizer: Any,
    seed: int = 0,
    *,
    start: int = 0,
    stop: int | None = None,
    hint: int | None = None,
) -> Iterator[Sample]:
    """:func:`generate`'s samples from index ``start`` (before ``stop``), each built when asked for; equal
    to :func:`generate`'s when ``hint`` is sample ``start - 1``'s ``meta["haystack_size"]``
    (``_core.sample_chain``)."""
    check_int("length", length, 1)
    depth = _check_depth(depth_percent)
    check_tokenizer(tokenizer)
    template, _ = _niah_template(single=True)
    budget = length - MAX_NEW_TOKENS
    if budget <= 0:
        raise ValueError(
            f"length {length} leaves no room for a prompt ({MAX_NEW_TOKENS} tokens are generated)"
        )
    task = f"depth_{depth_percent:g}"

    def make(index: int, hint: int | None) -> Sample:
        rng = sample_rng("niah", length, depth, seed, index)
        key = _random_needle_part(rng, "words")
        value = _random_needle_part(rng, "numbers")
        needle = _NIAH_NEEDLE.format(type_needle_v="numbers", key=key, value=value)

        def build(size: int) -> Built:
            context = essay_haystack(size, [needle], [depth / 100])
            text = template.format(type_needle_v="number", context=context, query=key)
            return Built(text, [value], {"depth": depth_percent, "key": key})

        size, built, tokens = fit_haystack(
            build, tokenizer, budget, minimum=1, hint=hint, what=f"niah at length {length}"
        )
        meta = {"haystack_size": size, **built.meta}
        return Sample(task, length, index, built.text, list(built.answers), MAX_NEW_TOKENS, tokens, meta)

    return sample_chain(make, start, stop, hint)


def score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the needle's value occurs in the prediction (case-insensitive), else 0.0."""
    return string_match_all(prediction, answers)


def save_heatmap(
    scores: Mapping[tuple[float, int], float], path: str | os.PathLike, title: str | None = None
) -> str:
    """Save a depth (rows, %) x context length (columns, tokens) heatmap of ``scores`` as a PNG.

    ``scores`` maps ``(depth_percent, length)`` to a score in [0, 1]; missing cells are left blank.
    Red is 0, yellow 0.5, green 1, as in the usual needle plots. Returns the path written.
    """
    if not scores:
        raise ValueError("scores is empty: nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    depths = sorted({d for d, _ in scores})
    lengths = sorted({n for _, n in scores})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), value in scores.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"score at depth {d}, length {n} must be in [0, 1], got {value}")
        grid[depths.index(d), lengths.index(n)] = value
    cmap = LinearSegmentedColormap.from_list("ryg", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"])
    width = max(4.0, 1.0 + 0.9 * len(lengths))
    height = max(3.0, 1.0 + 0.45 * len(depths))
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="retrieval score")
    ax.set_title(title or "Needle in a haystack")
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
