"""SSAConfig: the knobs of selective sparse attention, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INDEXES = ("flat", "tree", "beam")
SUMMARIES = ("mean", "max")


@dataclass(frozen=True)
class SSAConfig:
    """Which key blocks each query token attends to.

    A token attends exactly to the union of: the first ``sink_blocks`` blocks, the ``local_blocks``
    blocks ending with its own block, and the ``top_k`` other earlier blocks whose summary scores
    highest against its query. At most ``max_keys = (sink_blocks + local_blocks + top_k) * block_size``.

    Args:
        block_size: keys per block (the last block of a sequence may be partial).
        top_k: routed blocks per query token.
        sink_blocks: leading blocks every token sees (attention sinks).
        local_blocks: blocks ending with (and including) the token's own block.
        index: ``"flat"`` scores every earlier block (exact top-k, ``O(N/block_size)`` per query);
            ``"tree"`` scores groups of blocks by an upper bound first, then only the blocks of the best
            group of each of ``tree_probe`` interleaved stretches of groups (``O(sqrt(N))`` per query;
            see ``select.py``); ``"beam"`` (causal only) searches a three-level tree of blocks, groups of
            ``tree_group`` blocks and groups of ``tree_group`` groups, keeping the ``tree_probe`` best
            nodes per level (``O(N / (tree_group**2 * block_size) + tree_probe * tree_group)`` per query).
        summary: how a block scores for routing: ``"mean"``, the routing query against the block's
            mean key; ``"max"``, the best score of the block's sub-blocks of ``sub_block_size`` keys,
            each summarised by its mean key. A few distinctive keys among many ordinary ones move a
            sub-block's mean more than the block's; routing reads ``block_size / sub_block_size``
            times more summaries. ``"max"`` routes with ``index="flat"`` only.
        sub_block_size: keys per sub-block for ``summary="max"`` (a power of two below
            ``block_size``); None for ``"mean"``.
        tree_group: blocks per group for ``index="tree"``; ``None`` picks ``~sqrt(num_blocks / top_k)``.
            For ``"beam"``: children per node (a power of two), ``None`` means 8.
        tree_probe: groups expanded per query (stretches) for ``index="tree"``; for ``"beam"`` the nodes
            kept per level; ``None`` means ``top_k``.
    """

    block_size: int = 64
    top_k: int = 16
    sink_blocks: int = 1
    local_blocks: int = 2
    index: str = "flat"
    summary: str = "mean"
    sub_block_size: int | None = None
    tree_group: int | None = None
    tree_probe: int | None = None

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise ValueError(f"block_size={self.block_size!r}: expected a power of two >= 16")
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("sink_blocks", self.sink_blocks, minimum=0)
        _check_int("local_blocks", self.local_blocks, minimum=1)
        if self.index not in INDEXES:
            raise ValueError(f"index={self.index!r}: expected one of {INDEXES}")
        if self.summary not in SUMMARIES:
            raise ValueError(f"summary={self.summary!r}: expected one of {SUMMARIES}")
        if self.summary == "mean" and self.sub_block_size is not None:
            raise ValueError(
                f"sub_block_size={self.sub_block_size!r}: only summary='max' has sub-blocks; expected None"
            )
        if self.summary == "max":
            if self.sub_block_size is None:
                raise ValueError(
                    "summary='max' needs sub_block_size (keys per sub-block, a power of two below "
                    f"block_size={self.block_size}), e.g. {self.block_size // 4}"
                )
            _check_int("sub_block_size", self.sub_block_size, minimum=1)
            if self.sub_block_size & (self.sub_block_size - 1) or self.sub_block_size >= self.block_size:
                raise ValueError(
                    f"sub_block_size={self.sub_block_size!r}: expected a power of two below "
                    f"block_size={self.block_size}"
                )
            if self.index != "flat":
                raise ValueError(f"index={self.index!r}: summary='max' routes with index='flat' only")
        if self.tree_group is not None:
            _check_int("tree_group", self.tree_group, minimum=2)
            if self.index == "beam" and self.tree_group & (self.tree_group - 1):
                raise ValueError(f"tree_group={self.tree_group!r}: index='beam' expects a power of two")
        if self.tree_probe is not None:
            _check_int("tree_probe", self.tree_probe, minimum=1)

    @property
    def blocks_per_query(self) -> int:
        """Width K of the selection: sink + local + routed slots."""
        return self.sink_blocks + self.local_blocks + self.top_k

    @property
    def summary_size(self) -> int:
        """Keys per routing summary: ``block_size`` (``"mean"``) or ``sub_block_size`` (``"max"``)."""
        return self.block_size if self.sub_block_size is None else self.sub_block_size

    @property
    def summaries_per_block(self) -> int:
        return self.block_size // self.summary_size

    @property
    def max_keys(self) -> int:
        return self.blocks_per_query * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | SSAConfig | None) -> SSAConfig:
        """Build from a dict (e.g. ``config.ssa`` of a transformers config); unknown keys are errors."""
        if values is None:
            return cls()
        if isinstance(values, SSAConfig):
            return values
        if not isinstance(values, dict):
            raise TypeError(f"ssa config: expected a dict or SSAConfig, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ssa config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    @staticmethod
    def override(base: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
        """``base`` settings (a saved model's ``ssa`` dict) with ``changes`` applied, not yet validated.

        Switching to ``summary="mean"`` drops the base's ``sub_block_size``, which belongs to its
        ``"max"``: ``{"summary": "mean"}`` alone turns a ``max`` model back to mean routing.
        """
        merged = {**(base or {}), **changes}
        if changes.get("summary") == "mean" and "sub_block_size" not in changes:
            merged.pop("sub_block_size", None)
        return merged


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected an int")
    if value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
