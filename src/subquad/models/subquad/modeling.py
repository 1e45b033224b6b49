"""Subquad models: a Llama-style decoder (RMSNorm, SwiGLU, GQA) with SSA in every layer.

One file, top to bottom: rotary, norm, MLP, attention, decoder layer, ``SubquadModel``,
``SubquadForCausalLM``. Attention paths:

* ``attention="ssa", position_scheme="rope"``: ``subquad.ssa_attention`` (Triton on CUDA); a decode
  step goes through ``ssa_decode`` (Triton split-K kernel on CUDA) against the cache's summaries.
* ``attention="ssa", position_scheme="local_rope"``: routing on pre-rotary q/k
  (``select_blocks``), then ``sparse_attention_torch`` scores the local window with rotated q/k and
  sink/routed blocks without rotation in one softmax. This runs on the **torch path** on every device
  (the fused kernels take one score per key; a kernel variant is future work).
* ``attention="dense"``: the dense twin. ``rope``: torch SDPA (flash on CUDA); ``local_rope``:
  ``dense_local_rotary_attention`` (flash for the keys before the window, the window gathered).

``router="learned"`` gives every layer a routing query/key projection of its own (reading the layer
input detached) that replaces the pre-rotary q/k in routing only; the router loss trains it.
``router="gated"`` adds a per-token gate on the routing keys (``SubquadConfig``). ``coarse_span``
adds the coarse context term (``subquad.models.coarse``) to the sparse output, on every path.

The cache (:class:`subquad.SSACache`) stores each row's real tokens only, so positions are simply
indices in the row: a left-padded batch behaves exactly like its prompts run one at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from subquad.cache import CACHE_KWARG, SSACache, SSACacheLayer
from subquad.models.coarse import coarse_context_attention
from subquad.models.dense_local import dense_local_rotary_attention
from subquad.models.recall_loss import selection_recall_loss
from subquad.models.routing_loss import loss_rows, routing_distillation_loss
from subquad.models.sparse_torch import sparse_attention_torch
from subquad.models.sparse_triton import sparse_attention_local_rotary_triton
from subquad.models.subquad.configuration import SubquadConfig
from subquad.ops import fused
from subquad.ops.ssa.interface import resolve_backend, ssa_attention
from subquad.ops.ssa.select import SSASelection, select_blocks
from subquad.ops.ssa.triton_decode import (
    DecodePlan,
    decode_plan,
    decode_step,
    fused_decode_step,
    kept_index,
    ssa_decode,
)

# Dense prefill chunks off CUDA: SDPA with an explicit bottom-right mask, queries per call so the mask
# stays under 2^28 elements.
_DENSE_MASK_ELEMENTS = 1 << 28
# Router loss: the query rows just before each end-of-document token (where a document's closing
# question and its answer sit) are always supervised, at most this many per forward.
_FOCUS_BEFORE_EOS = 12
_MAX_FOCUS_ROWS = 512
# SDPA backends for a dense decode step on CUDA: cuDNN builds an execution plan per key length, i.e.
# per step, which costs milliseconds per layer; flash (split-KV for one query) reads the cache once.
# None: SDPA's own choice.
DENSE_DECODE_BACKENDS: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class SubquadRotary:
    """Rotary position embedding computed on the fly (no buffers: nothing to save or re-init).

    ``tables(positions)`` once per forward (every layer rotates by the same positions), then
    ``rotate(x, tables)`` per tensor: ``x * [cos, cos] + [x2, x1] * [-sin, sin]``, in float32, which is
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` to the bit.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([cos, cos], [-sin, sin])`` of ``positions``: float32 ``[*positions.shape, D]`` each."""
        half = self.head_dim // 2
        inv_freq = self.theta ** (-torch.arange(0, half, device=positions.device, dtype=torch.float32) / half)
        freqs = fused.rotary_angles(positions, inv_freq)  # [..., D/2], exact to float32 at 12M positions
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate ``x [..., D]`` by ``tables`` (from :meth:`tables`, broadcastable to ``x``); one
        kernel on CUDA at inference (``subquad.ops.fused``)."""
        if x.dim() == 4 and tables[0].dim() == 4:
            return fused.rotate(x, *tables)
        return fused.rotate_reference(x, *tables)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., D]`` by ``positions`` (broadcastable to ``x.shape[:-1]``), in float32."""
        return self.rotate(x, self.tables(positions))


class SubquadRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One kernel on CUDA at inference, the PyTorch ops elsewhere (subquad.ops.fused).
        return fused.rms_norm(x, self.weight, self.eps)


class SubquadMLP(nn.Module):
    def __init__(self, config: SubquadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))


class SubquadAttention(nn.Module):
    def __init__(self, config: SubquadConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary = SubquadRotary(self.head_dim, config.rope_theta)
        self.router_q_proj = self.router_k_proj = self.router_k_gate = None
        # A learned router draws its weights apart from the global random stream (here and in
        # `_init_weights`), so the rest of the model starts as it would without one: an SSA model and
        # its dense twin built with one seed share their initial weights.
        with torch.random.fork_rng(devices=[]):
            if config.router != "shared":
                width = self.num_kv_heads * self.head_dim
                self.router_q_proj = nn.Linear(config.hidden_size, width, bias=False)
                self.router_k_proj = nn.Linear(config.hidden_size, width, bias=False)
            if config.router == "gated":
                self.router_k_gate = nn.Linear(config.hidden_size, self.num_kv_heads, bias=True)
            self.coarse_key_map = self.coarse_value_map = None
            if config.coarse_span is not None and layer_idx in (config.coarse_layers or [layer_idx]):
                self.coarse_key_map = nn.Linear(self.head_dim, self.head_dim, bias=False)
                self.coarse_value_map = nn.Linear(self.head_dim, self.head_dim, bias=False)
                for module in (self.coarse_key_map, self.coarse_value_map):
                    module.identity_init = True  # `_init_weights`: the spans' plain means at the start
        for offset, module in enumerate((self.router_q_proj, self.router_k_proj, self.router_k_gate)):
            if module is not None:
                module.router_init_stream = 3 * layer_idx + offset
        # Auxiliary losses (SubquadForCausalLM.enable_routing_loss / enable_recall_loss): query rows per
        # sequence, and the last training forward's values, collected by the LM head's forward.
        self.routing_loss_queries = 0
        self.routing_loss_temperature = 1.0  # < 1 sharpens the router loss's target
        self.routing_loss: torch.Tensor | None = None
        self.recall_loss_queries = 0
        self.recall_loss: torch.Tensor | None = None
        self.loss_focus: torch.Tensor | None = None  # extra query rows for both, set per forward
        # `coarse_dropout`: the training rows that keep the coarse term, ``[B]`` bool, set per forward.
        self.coarse_keep: torch.Tensor | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        cache_layer: SSACacheLayer | None = None,
        valid: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        plan: DecodePlan | None = None,
    ) -> torch.Tensor:
        """hidden_states ``[B, T, C]``; positions ``[B, T]``; valid ``[B, T]`` bool (None: all real).

        Computed once per forward by the model and shared by its layers: ``rope``, the rotary tables of
        ``positions[:, :, None]`` (``SubquadRotary.tables``); ``plan``, a decode step's routing plan
        (:func:`subquad.ops.ssa.triton_decode.decode_plan` for the lengths after this step's append).
        """
        batch, steps, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, steps, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, steps, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, steps, self.num_kv_heads, self.head_dim)
        if self.config.position_scheme == "rope":
            if rope is None:
                rope = self.rotary.tables(positions[:, :, None])
            q = self.rotary.rotate(q, rope)
            k = self.rotary.rotate(k, rope)
        route = None
        if self.router_q_proj is not None:
            # Detached: the router learns from its own loss and never pushes on the residual stream.
            routed_from = hidden_states.detach()
            route_k = self.router_k_proj(routed_from).view(batch, steps, self.num_kv_heads, self.head_dim)
            if self.router_k_gate is not None:
                route_k = route_k * (2 * torch.sigmoid(self.router_k_gate(routed_from)))[..., None]
            route = (
                self.router_q_proj(routed_from).view(batch, steps, self.num_kv_heads, self.head_dim),
                route_k,
            )
        if cache_layer is None:
            out = self._attend(q, k, v, None, route)
        else:
            cache_layer.append(k, v, valid, route_keys=None if route is None else route[1])
            lengths = cache_layer.lengths
            k_all, v_all, summaries = (
                cache_layer.keys_bshd(),
                cache_layer.values_bshd(),
                cache_layer.summaries(),
            )
            if route is not None:
                route = (route[0], cache_layer.route_keys_bshd())
            if (
                plan is not None
                and steps == 1
                and valid is None
                and self._uses_decode_kernel()
                and plan.lengths == tuple(lengths)
            ):
                out = self._decode_sparse(q, k_all, v_all, summaries, plan, cache_layer)
            elif valid is None and len(set(lengths)) == 1:
                out = self._attend(q, k_all, v_all, summaries, route)
            elif valid is None and steps == 1 and self._uses_decode_kernel():
                out = ssa_decode(
                    q,
                    k_all,
                    v_all,
                    self.config.ssa_config,
                    seqlens=cache_layer.seqlens,
                    summaries=summaries,
                    scale=self.scale,
                )
            else:
                out = self._attend_rows(q, k_all, v_all, summaries, route, lengths, valid)
        return self.o_proj(out.reshape(batch, steps, -1))

    def _uses_decode_kernel(self) -> bool:
        return self.config.attention == "ssa" and self.config.position_scheme == "rope"

    @torch.compiler.disable
    def _decode_sparse(self, q, k, v, summaries, plan: DecodePlan, cache_layer: SSACacheLayer):
        """One new token per row against the cache, with the step's shared plan: no input checks and
        no host sync (``ssa_decode`` without its validation); the tree's and the beam's node bounds are
        kept in the cache layer between steps (``kept_index``)."""
        ssa = self.config.ssa_config
        backend = resolve_backend("auto", q, v)
        kept = kept_index(cache_layer.derived, ssa)
        return decode_step(q, k, v, summaries, plan, ssa, self.scale, backend, kept)[0]

    @torch.compiler.disable
    def _decode_from_projection(self, qkv, rope, pos, plan: DecodePlan, cache_layer: SSACacheLayer):
        """The graphed decode step's attention (``GraphedDecoder``): from the q/k/v projection's output
        ``[B, 1, Hq + 2 Hkv, D]``, the rotary tables ``rope`` of the token's key block and its position
        ``pos`` (rows of one length), the token's rotation, cache append, routing and attention
        (``fused_decode_step``: on CUDA three kernels a layer for either index)."""
        ssa = self.config.ssa_config
        buffers = cache_layer._key_buf, cache_layer._value_buf, cache_layer._means
        backend = resolve_backend("auto", qkv, buffers[1])
        kept = kept_index(cache_layer.derived, ssa)
        return fused_decode_step(qkv, *rope, pos, *buffers, plan, ssa, self.scale, backend, kept)[0]

    def _attend_rows(self, q, k_all, v_all, summaries, route, lengths, valid) -> torch.Tensor:
        """Rows of different lengths: each row attends over its own tokens (padded queries give 0)."""
        out = q.new_zeros(*q.shape[:3], v_all.shape[-1])
        per_summary = self.config.ssa_config.summary_size
        for row, length in enumerate(lengths):
            steps = slice(None) if valid is None else valid[row]
            q_row = q[row : row + 1][:, steps]
            if q_row.shape[1] == 0:
                continue
            route_row = None
            if route is not None:
                route_row = (route[0][row : row + 1][:, steps], route[1][row : row + 1, :length])
            summ = summaries[row : row + 1, : -(-length // per_summary)]
            o_row = self._attend(
                q_row, k_all[row : row + 1, :length], v_all[row : row + 1, :length], summ, route_row
            )
            if valid is None:
                out[row] = o_row[0]
            else:
                out[row, valid[row]] = o_row[0]
        return out

    def _attend(self, q, k, v, summaries, route=None) -> torch.Tensor:
        """Causal attention, bottom-right aligned, all rows of the same length: ``[B, T, Hq, Dv]``."""
        if self.config.attention == "dense":
            if self.config.position_scheme == "local_rope":
                return self._attend_dense_local(q, k, v)
            return _dense_sdpa(q, k, v, self.scale)
        out = self._attend_sparse(q, k, v, summaries, route)
        if self.coarse_key_map is not None:
            out = out + self._attend_coarse(q, k, v)
        return out

    # Kept out of torch.compile's graph like the sparse part beside it: its mask's width follows the key
    # length, which would recompile at every curriculum length and decode step.
    @torch.compiler.disable
    def _attend_coarse(self, q, k, v) -> torch.Tensor:
        ssa = self.config.ssa_config
        term = coarse_context_attention(
            q, k, v, self.config.coarse_span, ssa.block_size, ssa.local_blocks, self.scale,
            self.coarse_key_map, self.coarse_value_map,
        )  # fmt: skip
        if self.config.coarse_heads is not None:
            # Built here, not held as a buffer: `from_pretrained` leaves non-persistent buffers unset.
            heads = torch.zeros(self.num_heads, 1, dtype=term.dtype, device=term.device)
            heads[self.config.coarse_heads] = 1
            term = term * heads
        if self.training and self.coarse_keep is not None:
            term = term * self.coarse_keep.to(term.dtype)[:, None, None, None]
        return term

    # The autograd Function calls PyTorch's flash kernels directly: kept out of torch.compile's graph.
    @torch.compiler.disable
    def _attend_dense_local(self, q, k, v) -> torch.Tensor:
        ssa = self.config.ssa_config
        return dense_local_rotary_attention(
            q, k, v, self.scale, self.rotary, ssa.block_size, ssa.local_blocks
        )

    @torch.no_grad()
    def init_router_from_attention(self) -> None:
        """Set the learned router to score exactly like the shared one: routing key = the key
        projection, routing query = the sum of the group's query projections. Converting a model
        trained with the shared router this way loses nothing before the router loss moves it."""
        if self.router_q_proj is None:
            raise ValueError("init_router_from_attention: this layer has no learned router (router='shared')")
        group = self.num_heads // self.num_kv_heads
        summed = self.q_proj.weight.view(self.num_kv_heads, group, self.head_dim, -1).sum(1)
        self.router_q_proj.weight.copy_(summed.reshape_as(self.router_q_proj.weight))
        self.router_k_proj.weight.copy_(self.k_proj.weight)
        self.open_router_gate()

    @torch.no_grad()
    def open_router_gate(self) -> None:
        """A gated router's gate at exactly 1 for every token (zero weights and bias): the router then
        scores as its ungated projections do, so adding the gate to a trained router loses nothing."""
        if self.router_k_gate is not None:
            self.router_k_gate.weight.zero_()
            self.router_k_gate.bias.zero_()

    def select(self, q, k, summaries=None, route=None) -> SSASelection:
        """The blocks this layer's sparse attention attends to, for the inputs of ``_attend_sparse``.

        The router scores the attention's own q/k (``rope``: rotated; ``local_rope``: pre-rotary),
        or with ``route = (routing queries [B, T, Hkv, D], routing keys [B, S, Hkv, D])`` those of a
        learned router. ``summaries`` are precomputed routing summaries (block or sub-block means) of
        whichever keys route.
        """
        queries, keys = (q, k) if route is None else route
        with torch.no_grad():
            return select_blocks(
                queries.detach(), keys.detach(), self.config.ssa_config, causal=True, summaries=summaries
            )

    # torch.compile traces the rest of the layer; routing and the kernels' work lists are
    # data-dependent, so the sparse part runs eagerly.
    @torch.compiler.disable
    def _attend_sparse(self, q, k, v, summaries, route=None) -> torch.Tensor:
        config = self.config
        ssa = config.ssa_config
        if self.training and self.routing_loss_queries and summaries is None:
            self.routing_loss = routing_distillation_loss(
                q,
                k,
                ssa,
                self.scale,
                self.routing_loss_queries,
                route=route,
                focus=self.loss_focus,
                temperature=self.routing_loss_temperature,
            )
        recall_loss = self.training and self.recall_loss_queries and summaries is None
        if config.position_scheme == "rope":
            if q.shape[1] == 1 and summaries is not None:
                return ssa_decode(q, k, v, ssa, summaries=summaries, scale=self.scale)
            if not recall_loss:
                return ssa_attention(q, k, v, config=ssa, scale=self.scale, summaries=summaries)
            out, selection = ssa_attention(
                q, k, v, config=ssa, scale=self.scale, summaries=summaries, return_selection=True
            )
            self.recall_loss = self._selection_recall_loss(q, k, selection)
            return out
        # local_rope: q and k arrive unrotated; routing uses them as they are (pre-rotary).
        selection = self.select(q, k, summaries, route)
        if recall_loss:
            self.recall_loss = self._selection_recall_loss(q, k, selection)
        if resolve_backend("auto", q, v) == "triton":
            return sparse_attention_local_rotary_triton(
                q, k, v, selection.block_idx, ssa.block_size, self.scale, self.rotary, ssa.sink_blocks,
                ssa.local_blocks, selection.fixed_layout,
            )  # fmt: skip
        return sparse_attention_torch(
            q,
            k,
            v,
            selection.block_idx,
            ssa.block_size,
            self.scale,
            local_rotary=(self.rotary, ssa.sink_blocks, ssa.local_blocks),
        )

    def _selection_recall_loss(self, q, k, selection: SSASelection) -> torch.Tensor | None:
        """``-log`` attention recall of this layer's selection on its loss rows (``recall_loss.py``)."""
        ssa = self.config.ssa_config
        first = (ssa.sink_blocks + ssa.local_blocks) * ssa.block_size  # earlier rows select every key
        rows = loss_rows(q.shape[1], first, self.recall_loss_queries, self.loss_focus, q.device)
        rotary = None
        if self.config.position_scheme == "local_rope":
            rotary = (self.rotary, ssa.sink_blocks, ssa.local_blocks)
        return selection_recall_loss(q, k, selection.block_idx, ssa.block_size, self.scale, rows, rotary)


def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention via torch SDPA (bottom-right aligned), ``[B, T, Hq, D]`` in and out."""
    steps, seq_len = q.shape[1], k.shape[1]
    if steps == 1:
        return _dense_decode(q, k, v, scale)
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if steps == seq_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=steps > 1, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if q.is_cuda:
        # The explicit mask below runs SDPA's masked kernel a few hundred query rows at a time: a 1M-token
        # prompt of the nano twin took 259 s that way, 21-26 s this way (benchmarks/results/twin-2026-11-24/).
        return _dense_lower_right(qt, kt, vt, scale).transpose(1, 2)
    chunk = max(1, _DENSE_MASK_ELEMENTS // seq_len)
    key_pos = torch.arange(seq_len, device=q.device)
    outs = []
    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        mask = (
            key_pos <= torch.arange(seq_len - steps + start, seq_len - steps + stop, device=q.device)[:, None]
        )
        outs.append(
            F.scaled_dot_product_attention(
                qt[:, :, start:stop], kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


def _dense_lower_right(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``T`` of ``S`` positions, ``qt [B, Hq, T, D]`` against ``kt, vt
    [B, Hkv, S, D]``, through torch's bottom-right ``CausalBias``: flash (or the efficient kernel) with
    no mask tensor on CUDA, a materialised mask elsewhere. K and V heads are repeated for GQA, as those
    kernels take the query's head count."""
    groups = qt.shape[1] // kt.shape[1]
    if groups > 1:
        kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
    bias = causal_lower_right(qt.shape[2], kt.shape[2])
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale)


def _dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row, ``q [B, 1, Hq, D]`` against every key of ``k [B, S, Hkv, D]`` (views of the
    cache, read in place): the ``G = Hq / Hkv`` query heads of a KV head become ``G`` queries of that
    head (flash-decoding's layout), so SDPA needs no GQA expansion and reads each key once."""
    batch, _, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    grouped = q.reshape(batch, heads_kv, heads_q // heads_kv, dim)
    out = F.scaled_dot_product_attention(grouped, k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.reshape(batch, 1, heads_q, -1)


class SubquadDecoderLayer(nn.Module):
    def __init__(self, config: SubquadConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = SubquadAttention(config, layer_idx)
        self.mlp = SubquadMLP(config)
        self.input_layernorm = SubquadRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = SubquadRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, positions, cache_layer=None, valid=None, rope=None, plan=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), positions, cache_layer, valid, rope, plan
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SubquadPreTrainedModel(PreTrainedModel):
    config_class = SubquadConfig
    config: SubquadConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SubquadDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "identity_init", False):
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.copy_(torch.eye(*module.weight.shape))
            return None
        stream = getattr(module, "router_init_stream", None)
        if stream is None:
            return super()._init_weights(module)
        # A learned router's projection: a generator of its own, seeded from the global seed and its
        # place in the model, leaves the global stream to the other weights (see SubquadAttention).
        # `_is_hf_initialized`: a weight loaded by from_pretrained is left as loaded.
        weight, bias = module.weight, module.bias
        if not getattr(weight, "_is_hf_initialized", False):
            generator = torch.Generator(device=weight.device).manual_seed(torch.initial_seed() + 1 + stream)
            nn.init.normal_(weight, std=self.config.initializer_range, generator=generator)
        if bias is not None and not getattr(bias, "_is_hf_initialized", False):
            nn.init.zeros_(bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the forward creates an SSACache on first use.
        return False


class SubquadModel(SubquadPreTrainedModel):
    def __init__(self, config: SubquadConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([SubquadDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SubquadRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Decoder stack. ``attention_mask`` (``[B, past + T]`` or ``[B, T]``, 1 = real token) marks
        padding; padded tokens never enter the cache and their outputs are meaningless. Positions are
        each token's index among its row's real tokens (``position_ids`` is accepted for API
        compatibility and ignored: it cannot disagree with the cache). ``cache`` is newer transformers'
        name for ``past_key_values``: pass either."""
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: expected exactly one of them")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, steps = inputs_embeds.shape[:2]
        valid = _valid_mask(attention_mask, batch, steps)
        if use_cache is None:
            use_cache = self.config.use_cache
        cache = (
            _ssa_cache_for(past_key_values, self.config)
            if (use_cache or past_key_values is not None)
            else None
        )
        # Without a cache, padding still needs per-row storage: a throwaway cache gives it.
        work_cache = cache if cache is not None else (SSACache(self.config) if valid is not None else None)

        # Positions continue each row's cached tokens; rows of one length (the cache knows the lengths
        # on the host) need no device lengths at all.
        held = None
        if work_cache is not None and work_cache.layer(0).is_initialized:
            held = work_cache.layer(0).lengths
        device = inputs_embeds.device
        if valid is None and (held is None or len(set(held)) == 1):
            start = held[0] if held else 0
            positions = torch.arange(start, start + steps, device=device).expand(batch, -1)
        else:
            if valid is None:
                positions = torch.arange(steps, device=device).expand(batch, -1)
            else:
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            if held is not None:
                positions = positions + work_cache.seqlens(0).long()[:, None]
        # Shared by every layer, computed once: the rotary tables and, for a decode step, the routing
        # plan of the rows' lengths after this step (the cache knows them on the host: no sync).
        rope = None
        if self.config.position_scheme == "rope":
            rope = self.layers[0].self_attn.rotary.tables(positions[:, :, None])
        plan = None
        decoding = steps == 1 and valid is None and work_cache is not None
        if decoding and self.config.attention == "ssa" and self.config.position_scheme == "rope":
            plan = _decode_plan_for(work_cache, batch, self.config, device)
        dense_decode = decoding and self.config.attention == "dense" and inputs_embeds.is_cuda
        backends = DENSE_DECODE_BACKENDS
        context = sdpa_kernel(backends) if dense_decode and backends is not None else nullcontext()

        if self.training and self.config.coarse_dropout:
            keep = torch.rand(batch, device=device) >= self.config.coarse_dropout
            for layer in self.layers:
                layer.self_attn.coarse_keep = keep

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        with context:
            for i, layer in enumerate(self.layers):
                if all_hidden is not None:
                    all_hidden.append(hidden_states)
                layer_cache = work_cache.layer(i) if work_cache is not None else None
                if self.gradient_checkpointing and self.training and layer_cache is None:
                    hidden_states = torch.utils.checkpoint.checkpoint(
                        layer, hidden_states, positions, None, valid, rope, use_reentrant=False
                    )
                else:
                    hidden_states = layer(hidden_states, positions, layer_cache, valid, rope, plan)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_KWARG: cache},
        )


def _decode_plan_for(cache: SSACache, batch: int, config: SubquadConfig, device: torch.device) -> DecodePlan:
    """The routing plan of a one-token step: every layer of ``cache`` will hold its rows' current
    lengths plus one (a layer that does not falls back to its own routing).

    The cache's first layer keeps the last step's plan (``derived["decode_plan"]``, dropped when stored
    tokens change other than by appending): its block-level tensors are reused until a row's token
    moves into a new block, so most steps build only ``seqlens``.
    """
    first = cache.layer(0)
    held = first.lengths if first.is_initialized else [0] * batch
    lengths = [n + 1 for n in held]
    if len(set(lengths)) == 1:
        seqlens = torch.full((batch,), lengths[0], dtype=torch.int32, device=device)
    else:
        seqlens = first.seqlens + 1
    num_blocks = -(-max(lengths) // config.ssa_config.block_size)
    plan = decode_plan(
        seqlens, num_blocks, config.ssa_config, lengths, previous=first.derived.get("decode_plan")
    )
    first.derived["decode_plan"] = plan
    return plan


def _valid_mask(attention_mask: torch.Tensor | None, batch: int, steps: int) -> torch.Tensor | None:
    """``[B, T]`` bool of the new tokens' real positions, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        )
        raise ValueError(f"attention_mask: got {got}, expected a 2D [batch, length] padding mask (1 = token)")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < steps:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)}, expected [{batch}, >= {steps}] "
            "(past + new tokens)"
        )
    valid = attention_mask[:, -steps:].bool()
    return None if bool(valid.all()) else valid


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache a forward got, under either of its names (``cache``: newer transformers')."""
    if past_key_values is not None and cache is not None:
        raise ValueError(
            "past_key_values, cache: got both; pass the cache once (cache is newer transformers' name for it)"
        )
    return cache if past_key_values is None else past_key_values


def _ssa_cache_for(past_key_values: Cache | None, config: SubquadConfig) -> SSACache:
    if past_key_values is None:
        return SSACache(config)
    if isinstance(past_key_values, SSACache):
        if past_key_values.ssa_config.block_size != config.ssa_config.block_size:
            raise ValueError(
                f"past_key_values: SSACache block_size={past_key_values.ssa_config.block_size}, expected "
                f"{config.ssa_config.block_size} (the model's ssa.block_size)"
            )
        if past_key_values.ssa_config.summary_size != config.ssa_config.summary_size:
            raise ValueError(
                f"past_key_values: SSACache summarises every {past_key_values.ssa_config.summary_size} keys, "
                f"the model routes by summaries of {config.ssa_config.summary_size} (its ssa.summary)"
            )
        return past_key_values
    if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
        # An empty cache of another kind (e.g. generate()'s default DynamicCache): replace it.
        return SSACache(config)
    raise TypeError(
        f"past_key_values: got {type(past_key_values).__name__}, expected a subquad.SSACache (or None); "
        "Subquad models keep block summaries in their cache"
    )


class SubquadForCausalLM(SubquadPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SubquadConfig) -> None:
        super().__init__(config)
        self.model = SubquadModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.routing_loss_weight = 0.0
        self.last_routing_loss: torch.Tensor | None = None
        self.recall_loss_weight = 0.0
        self.last_recall_loss: torch.Tensor | None = None
        self.post_init()

    def enable_routing_loss(self, weight: float, num_queries: int = 64, temperature: float = 1.0) -> None:
        """Add ``weight`` x the layers' mean router loss (:mod:`subquad.models.routing_loss`) to the
        training loss, measured on ``num_queries`` evenly spaced query rows per sequence plus the
        rows just before each end-of-document token (``config.eos_token_id``), where long-range
        questions are answered; ``weight=0`` turns it off. ``last_routing_loss`` holds the last value
        (detached). ``temperature`` < 1 sharpens the loss's target (see ``routing_distillation_loss``).
        With a learned router (``config.router`` ``"learned"`` or ``"gated"``) this loss is the only
        thing that trains it."""
        self._check_layer_loss("router loss", weight, num_queries)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a number > 0 (1 = the plain block mass)")
        self.routing_loss_weight = float(weight)
        for layer in self.model.layers:
            layer.self_attn.routing_loss_queries = num_queries if weight > 0 else 0
            layer.self_attn.routing_loss_temperature = float(temperature)

    def enable_recall_loss(self, weight: float, num_queries: int = 64) -> None:
        """Add ``weight`` x the layers' mean ``-log`` attention recall of their own selections
        (:mod:`subquad.models.recall_loss`) to the training loss, on the same kind of query rows as the
        router loss: ``num_queries`` evenly spaced ones per sequence plus those just before each
        end-of-document token. It trains the attention's q and k to keep their dense softmax mass on
        the keys SSA selects; ``weight=0`` turns it off. ``last_recall_loss`` holds the last value
        (detached; ``exp(-value)`` is about the rows' geometric-mean recall)."""
        self._check_layer_loss("recall loss", weight, num_queries)
        self.recall_loss_weight = float(weight)
        for layer in self.model.layers:
            layer.self_attn.recall_loss_queries = num_queries if weight > 0 else 0

    def _check_layer_loss(self, name: str, weight: Any, num_queries: Any) -> None:
        """The arguments both auxiliary losses share: a weight >= 0, query rows >= 1, an SSA model."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"weight={weight!r}: expected a number >= 0")
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries={num_queries!r}: expected an int >= 1")
        if weight > 0 and self.config.attention != "ssa":
            attention = self.config.attention
            raise ValueError(f"weight={weight}: the {name} needs attention='ssa', not {attention!r}")

    def router_parameters(self) -> list[nn.Parameter]:
        """The learned router's weights, gates included (none with ``router="shared"``); only the router
        loss trains them."""
        attentions = [layer.self_attn for layer in self.model.layers]
        modules = [m for a in attentions for m in (a.router_q_proj, a.router_k_proj, a.router_k_gate)]
        return [p for m in modules if m is not None for p in m.parameters()]

    @torch.compiler.disable  # data-dependent sizes: keep it out of a compiled graph
    def _set_loss_focus(self, input_ids: torch.Tensor | None) -> None:
        """Hand the layers the rows before each end-of-document token of this batch (union over rows)."""
        focus = None
        eos = self.config.eos_token_id
        if input_ids is not None and isinstance(eos, int):
            ends = (input_ids == eos).nonzero()[:, 1].unique()
            before = torch.arange(1, _FOCUS_BEFORE_EOS + 1, device=ends.device)
            focus = (ends[:, None] - before).flatten().unique()
            focus = focus[focus >= 0][-_MAX_FOCUS_ROWS:]
        for layer in self.model.layers:
            layer.self_attn.loss_focus = focus

    def _collect_layer_loss(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Mean of the layers' ``name`` losses from this forward (0 when no row had candidates); the
        value, detached, goes to ``last_{name}``."""
        terms = []
        for layer in self.model.layers:
            term = getattr(layer.self_attn, name)
            if term is not None:
                terms.append(term)
                setattr(layer.self_attn, name, None)
        value = torch.stack(terms).mean() if terms else like.new_zeros(())
        setattr(self, f"last_{name}", value.detach())
        return value

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        loss_weights: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (``logits_to_keep``: 0 = every position, n = the last n, or a tensor of indices) and,
        with ``labels`` (``-100`` ignored), the next-token cross-entropy loss; ``loss_weights`` (shaped
        like ``labels``, >= 0) weighs each label's term: the loss is ``sum(w * ce) / sum(w)``.

        A prompt longer than ``config.prefill_chunk_tokens`` going into a cache is prefilled chunk by
        chunk (see :func:`subquad.models.prefill`): memory stays linear in its length. ``cache`` is newer
        transformers' name for ``past_key_values`` (their ``generate()`` passes it): pass either.
        """
        past_key_values = _one_cache(past_key_values, cache)
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None
        steps = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if (
            labels is None
            and (use_cache or past_key_values is not None)
            and steps > self.config.prefill_chunk_tokens
            and not output_hidden_states
        ):
            from subquad.models.prefill import prefill

            return prefill(
                self,
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=past_key_values,
                chunk_size=self.config.prefill_chunk_tokens,
                logits_to_keep=logits_to_keep,
            )
        if self.training and (self.routing_loss_weight > 0 or self.recall_loss_weight > 0):
            self._set_loss_focus(input_ids)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise ValueError(
                    f"logits_to_keep={logits_to_keep}: expected an int >= 0 (0 = all) or a tensor"
                )
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(
                    f"labels: length {labels.shape[1]}, but logits cover {logits.shape[1]} positions "
                    "(use logits_to_keep=0 when training)"
                )
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            if loss_weights is None:
                loss = F.cross_entropy(flat_logits, targets, ignore_index=-100)
            else:
                if loss_weights.shape != labels.shape:
                    raise ValueError(
                        f"loss_weights: shape {tuple(loss_weights.shape)}, expected the labels' shape "
                        f"{tuple(labels.shape)}"
                    )
                terms = F.cross_entropy(flat_logits, targets, ignore_index=-100, reduction="none")
                weights = loss_weights[:, 1:].reshape(-1).to(terms) * (targets != -100)
                loss = (terms * weights).sum() / weights.sum().clamp_min(1e-6)
            if self.training and self.routing_loss_weight > 0:
                loss = loss + self.routing_loss_weight * self._collect_layer_loss("routing_loss", loss)
            if self.training and self.recall_loss_weight > 0:
                loss = loss + self.recall_loss_weight * self._collect_layer_loss("recall_loss", loss)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )
