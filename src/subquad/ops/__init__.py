"""Attention operators: the dense oracle and selective sparse attention (SSA)."""

from subquad.ops.dense import dense_attention
from subquad.ops.ssa import (
    SSAConfig,
    SSASelection,
    attention_recall,
    block_summaries,
    select_blocks,
    sparse_attention_naive,
    ssa_attention,
)

__all__ = [
    "SSAConfig",
    "SSASelection",
    "attention_recall",
    "block_summaries",
    "dense_attention",
    "select_blocks",
    "sparse_attention_naive",
    "ssa_attention",
]
