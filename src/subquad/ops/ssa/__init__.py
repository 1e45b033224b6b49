"""Selective sparse attention: routing (``select``), reference (``naive``), kernels, public API."""

from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.interface import attention_recall, ssa_attention
from subquad.ops.ssa.naive import sparse_attention_naive
from subquad.ops.ssa.select import SSASelection, block_summaries, select_blocks

__all__ = [
    "SSAConfig",
    "SSASelection",
    "attention_recall",
    "block_summaries",
    "select_blocks",
    "sparse_attention_naive",
    "ssa_attention",
]
