"""Command-line values shared by the CLIs."""

from __future__ import annotations

import json
from typing import Any


def key_values(text: str) -> dict[str, Any]:
    """`top_k=8,block_size=64` or JSON `{"top_k": 8}` -> dict (values parsed as JSON when possible).

    Commas inside brackets belong to the value: `coarse_layers=[0,1],coarse_span=256`.
    """
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in _split_top_level(text))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected key=value")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside ``[...]`` and ``{...}``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]
