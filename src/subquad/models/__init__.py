"""Subquad model family (``SubquadConfig``, ``SubquadForCausalLM``), long-prompt prefill, and a decode
step replayed as a CUDA graph (``GraphedDecoder``)."""

from subquad.models.prefill import prefill
from subquad.models.subquad.configuration import FLAVORS, SubquadConfig
from subquad.models.subquad.graphed import GraphedDecoder
from subquad.models.subquad.modeling import SubquadForCausalLM, SubquadModel

_REGISTERED = False


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="subquad"`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("subquad", SubquadConfig, exist_ok=True)
    AutoModel.register(SubquadConfig, SubquadModel, exist_ok=True)
    AutoModelForCausalLM.register(SubquadConfig, SubquadForCausalLM, exist_ok=True)
    _REGISTERED = True


__all__ = [
    "FLAVORS",
    "GraphedDecoder",
    "SubquadConfig",
    "SubquadForCausalLM",
    "SubquadModel",
    "prefill",
    "register_auto_classes",
]
