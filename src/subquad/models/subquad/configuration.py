"""SubquadConfig: a Llama-style decoder with selective sparse attention (SSA) in every layer."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from subquad.ops.ssa.config import SSAConfig

ATTENTIONS = ("ssa", "dense")
POSITION_SCHEMES = ("rope", "local_rope")
ROUTERS = ("shared", "learned", "gated")

# name -> architecture. debug: CPU tests; nano: ~10M parameters (small enough to ship in the repo);
# small: ~120M, the benchmark model. KV heads are few so a 12M-token cache of `small` fits an H200.
FLAVORS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        ssa=dict(block_size=16, top_k=2, sink_blocks=1, local_blocks=2),
    ),
    "nano": dict(
        vocab_size=8192, hidden_size=320, intermediate_size=864, num_hidden_layers=8,
        num_attention_heads=5, num_key_value_heads=1,
        ssa=dict(block_size=64, top_k=16, sink_blocks=1, local_blocks=2),
    ),
    "small": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=2,
        ssa=dict(block_size=64, top_k=16, sink_blocks=1, local_blocks=2),
    ),
}  # fmt: skip


class SubquadConfig(PretrainedConfig):
    """Configuration of a Subquad model (``model_type="subquad"``).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim (default ``hidden_size // num_attention_heads``), rms_norm_eps,
        initializer_range, tie_word_embeddings: the usual Llama fields.
        attention: ``"ssa"`` (selective sparse attention) or ``"dense"`` (exact causal attention: the
            dense twin, same architecture and weights layout).
        position_scheme: ``"rope"`` (rotary on every score) or ``"local_rope"`` (rotary only for keys in
            the query's local window; sink and routed blocks are scored without position; routing uses
            pre-rotary queries and keys). With ``attention="dense"``, ``"local_rope"`` scores the window
            (``ssa.local_blocks`` blocks of ``ssa.block_size`` ending with the query's) with rotary and
            every earlier key without: the twin of a ``local_rope`` SSA model, equal to it at full budget.
        router: what routing scores. ``"shared"``: the attention's own (pre-rotary) queries and keys.
            ``"learned"``: a routing query and key projection of their own per layer (``router_q_proj``,
            ``router_k_proj``, reading the layer input detached), trained only by the router loss
            (``SubquadForCausalLM.enable_routing_loss``) to rank blocks the way dense attention would
            weigh them; the language-model loss never sees them. Needs ``"local_rope"``.
            ``"gated"``: ``"learned"`` with each routing key scaled by a learned per-token gate,
            ``2 * sigmoid(router_k_gate(x))`` (1 at initialisation). A block summary is the mean of
            its routing keys, so without a gate it is linear in the block's mean input and one
            distinctive token is diluted by the other 63; the gate lets the router weigh the tokens
            worth finding above the rest. Summaries stay means: the routing kernels are unchanged.
        coarse_span: ``None`` (off) or a span length in tokens: every complete span that ends before a
            query's local window becomes one extra entry (its mean key and mean value through learned
            maps) in a softmax of its own, added to the sparse output (``subquad.models.coarse``).
            Gives the query its unselected context in summary, at ``S / coarse_span`` entries a query.
            Needs ``attention="ssa"`` and ``position_scheme="local_rope"`` (the spans' keys are pre-rotary).
        coarse_layers: with ``coarse_span``, the indices of the layers that have the term (``None``: all);
            the other layers attend only to their exact selected keys.
        coarse_heads: with ``coarse_span``, the indices of the query heads that get the term (``None``:
            all); the other heads attend only to their exact selected keys.
        coarse_dropout: with ``coarse_span``, the probability that a training sequence runs without the
            term in every layer (not rescaled: evaluation always has it), so the exact keys keep
            carrying what the summaries cannot.
        rope_theta: rotary base.
        ssa: dict of :class:`subquad.SSAConfig` fields (block size, budget, index).
        prefill_chunk_tokens: prompts longer than this are prefilled chunk by chunk through the cache.
    """

    model_type = "subquad"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 160,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        attention: str = "ssa",
        position_scheme: str = "local_rope",
        router: str = "shared",
        coarse_span: int | None = None,
        coarse_layers: list[int] | None = None,
        coarse_heads: list[int] | None = None,
        coarse_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        ssa: dict[str, Any] | SSAConfig | None = None,
        prefill_chunk_tokens: int = 32768,
        max_position_embeddings: int = 1 << 24,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention = attention
        self.position_scheme = position_scheme
        self.router = router
        self.coarse_span = coarse_span
        self.coarse_layers = list(coarse_layers) if isinstance(coarse_layers, tuple) else coarse_layers
        self.coarse_heads = list(coarse_heads) if isinstance(coarse_heads, tuple) else coarse_heads
        self.coarse_dropout = coarse_dropout
        self.rope_theta = rope_theta
        self.ssa = (ssa if isinstance(ssa, SSAConfig) else SSAConfig.from_dict(ssa)).to_dict()
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        self._validate()
        if self.head_dim is None:
            self.head_dim = hidden_size // num_attention_heads
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "prefill_chunk_tokens"):  # fmt: skip
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            _check_positive_int("head_dim", self.head_dim)
            if self.head_dim % 2:
                raise ValueError(f"head_dim={self.head_dim}: expected an even int (rotary pairs dimensions)")
        elif (
            self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2
        ):
            raise ValueError(
                f"hidden_size={self.hidden_size}: expected a multiple of num_attention_heads="
                f"{self.num_attention_heads} with an even quotient, or set head_dim"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads}: expected a divisor of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTIONS}")
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"position_scheme={self.position_scheme!r}: expected one of {POSITION_SCHEMES}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}: expected one of {ROUTERS}")
        if self.router != "shared" and (self.attention != "ssa" or self.position_scheme != "local_rope"):
            raise ValueError(
                f"router={self.router!r} with attention={self.attention!r}, position_scheme="
                f"{self.position_scheme!r}: expected attention='ssa' and position_scheme='local_rope'"
            )
        if self.coarse_span is not None:
            _check_positive_int("coarse_span", self.coarse_span)
            if self.attention != "ssa" or self.position_scheme != "local_rope":
                raise ValueError(
                    f"coarse_span={self.coarse_span} with attention={self.attention!r}, position_scheme="
                    f"{self.position_scheme!r}: expected attention='ssa' and position_scheme='local_rope'"
                )
        _check_indices("coarse_layers", self.coarse_layers, self.num_hidden_layers, self.coarse_span)
        _check_indices("coarse_heads", self.coarse_heads, self.num_attention_heads, self.coarse_span)
        p = self.coarse_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"coarse_dropout={p!r}: expected a probability in [0, 1)")
        if p and self.coarse_span is None:
            raise ValueError(f"coarse_dropout={p}: expected coarse_span to be set too")
        if (
            isinstance(self.rope_theta, bool)
            or not isinstance(self.rope_theta, (int, float))
            or self.rope_theta <= 1
        ):
            raise ValueError(f"rope_theta={self.rope_theta!r}: expected a number > 1")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r}: expected a positive float")

    @property
    def ssa_config(self) -> SSAConfig:
        """The :class:`SSAConfig` built from ``self.ssa``."""
        return SSAConfig.from_dict(self.ssa)

    @classmethod
    def from_flavor(cls, name: str, **overrides: Any) -> SubquadConfig:
        """A named size (``debug``, ``nano``, ``small``) with any field overridden.

        ``ssa`` overrides merge into the flavor's SSA settings: ``from_flavor("small", ssa={"top_k": 8})``.
        """
        if name not in FLAVORS:
            raise ValueError(f"flavor={name!r}: expected one of {tuple(FLAVORS)}")
        values = {**FLAVORS[name], **overrides}
        if isinstance(overrides.get("ssa"), dict):
            values["ssa"] = {**FLAVORS[name]["ssa"], **overrides["ssa"]}
        return cls(**values)


def _check_indices(name: str, value: Any, bound: int, coarse_span: int | None) -> None:
    """``None``, or distinct indices in ``[0, bound)`` for a model with the coarse term."""
    if value is None:
        return
    if not isinstance(value, list):
        raise TypeError(f"{name}={value!r}: expected None or a list of indices")
    if coarse_span is None:
        raise ValueError(f"{name}={value}: expected coarse_span to be set too")
    in_range = all(type(i) is int and 0 <= i < bound for i in value)
    if not value or not in_range or len(set(value)) != len(value):
        raise ValueError(f"{name}={value}: expected distinct indices in [0, {bound}), at least one")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected a positive int")
    if value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
