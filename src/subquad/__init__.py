"""subquad: subquadratic selective sparse attention (SSA) for million-token contexts."""

from subquad.cache import SSACache
from subquad.models import register_auto_classes as _register_auto_classes
from subquad.ops import (
    SSAConfig,
    SSASelection,
    attention_recall,
    block_summaries,
    dense_attention,
    select_blocks,
    ssa_attention,
)
from subquad.ops.ssa.triton_decode import ssa_decode

# `import subquad` makes AutoConfig / AutoModelForCausalLM know model_type="subquad".
_register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "SSACache",
    "SSAConfig",
    "SSASelection",
    "__version__",
    "attention_recall",
    "block_summaries",
    "dense_attention",
    "select_blocks",
    "ssa_attention",
    "ssa_decode",
]
