"""The Subquad architecture: configuration and modeling."""

from subquad.models.subquad.configuration import FLAVORS, SubquadConfig
from subquad.models.subquad.modeling import SubquadForCausalLM, SubquadModel

__all__ = ["FLAVORS", "SubquadConfig", "SubquadForCausalLM", "SubquadModel"]
