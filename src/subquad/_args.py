"""Command-line values shared by the CLIs."""

from __future__ import annotations

import json
from typing import Any


def key_values(text: str) -> dict[str, Any]:
    """`top_k=8,block_size=64` or JSON `{"top_k": 8}` -> dict (values parsed as JSON when possible)."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected key=value")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values
