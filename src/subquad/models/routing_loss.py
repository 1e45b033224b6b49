"""A training signal for the router: match the dense attention's mass over the routed candidates.

Routing (top-k of ``routing query . block summary``) is not differentiable, so the language-model
loss only shapes it indirectly, through the keys already selected. This loss gives it a direct
target: for a few query rows per sequence, the share of each candidate block in the layer's own dense
softmax over the candidate keys (sinks and the local window excluded: they are always attended),
and the router's softmax over the same blocks. ``KL(target || router)`` pulls the routing scores of
the blocks attention would use above the rest. The target is detached; the gradients reach whatever
routes: the attention's q and k (through the summaries) for the shared router, only the routing
projections for a learned one (``SubquadConfig.router="learned"``), whose target then stays put while
it learns. Cost per layer: ``rows x S`` scores, small next to the layer.
"""

from __future__ import annotations

import torch

from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import block_scores, routing_queries, routing_summaries


def loss_rows(
    seq_len: int, first: int, num_queries: int, focus: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The query rows an auxiliary attention loss scores: ``num_queries`` evenly spaced ones from
    ``first`` (the first token that has anything to route) to the end, plus the positions in ``focus``
    that fall in that range; sorted, unique, long. Empty when ``first >= seq_len``."""
    if seq_len <= first:
        return torch.zeros(0, dtype=torch.long, device=device)
    rows = torch.linspace(first, seq_len - 1, min(num_queries, seq_len - first), device=device).long()
    if focus is not None:
        focus = focus.to(device=device, dtype=torch.long)
        rows = torch.cat([rows, focus[(focus >= first) & (focus < seq_len)]])
    return rows.unique()


def routing_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SSAConfig,
    scale: float,
    num_queries: int,
    summaries: torch.Tensor | None = None,
    route: tuple[torch.Tensor, torch.Tensor] | None = None,
    focus: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """``KL(dense block mass || router distribution)`` over the routed candidates, averaged over the
    query rows that have candidates (``num_queries`` evenly spaced ones, plus the positions in
    ``focus``), batch and KV heads.

    q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` (self-attention, ``T == S``) as the attention scores
    them (the target). The router's logits are ``scale *`` the block scores routing ranks by
    (``routing query . summary``, or its best sub-block's with ``summary="max"``) where, by default,
    the routing query is the mean of the group's heads of q and the summaries are k's (sub-)block means;
    ``route = (rq [B, T, Hkv, D], rk [B, T, Hkv, D])`` routes with a learned router's queries and keys
    instead. ``temperature`` < 1 sharpens the target (block masses raised to ``1 / temperature``,
    renormalised), so the loss spends the router's capacity on ranking the few blocks that carry most
    of the mass, which is what a top-k selection needs, rather than on the long diffuse tail.
    Returns a scalar, or None when no row has a candidate block (sequences shorter than sinks + local
    window + 1 block).
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q, k: expected self-attention (T == S), got T={q.shape[1]}, S={k.shape[1]}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0 (1 = the plain block mass)")
    batch, seq_len, heads_q, dim = q.shape
    heads_kv, block_size = k.shape[2], config.block_size
    group = heads_q // heads_kv
    first = (config.sink_blocks + config.local_blocks) * block_size  # first token with a candidate
    if seq_len <= first or num_queries < 1:
        return None
    rows = loss_rows(seq_len, first, num_queries, focus, q.device)
    num_blocks = -(-seq_len // block_size)
    block = torch.arange(num_blocks, device=q.device)
    last_candidate = rows // block_size - config.local_blocks  # [R]
    candidate = (block >= config.sink_blocks) & (block <= last_candidate[:, None])  # [R, NB]

    q_rows = q[:, rows]  # [B, R, Hq, D]
    with torch.no_grad():
        keys = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, num_blocks * block_size - seq_len))
        keys = keys.repeat_interleave(group, dim=2)  # [B, NB * bs, Hq, D]
        scores = torch.einsum("brhd,bshd->bhrs", q_rows.float() * scale, keys)
        key_ok = candidate.repeat_interleave(block_size, dim=1)  # [R, NB * bs]
        scores = scores.masked_fill(~key_ok, float("-inf"))
        mass = torch.softmax(scores, dim=-1).view(batch, heads_q, len(rows), num_blocks, block_size).sum(-1)
        target = mass.view(batch, heads_kv, group, len(rows), num_blocks).mean(2)  # [B, Hkv, R, NB]
        if temperature != 1:
            target = target.pow(1.0 / temperature)
            target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)

    route_q, route_k = (q_rows, k) if route is None else (route[0][:, rows], route[1])
    summ = routing_summaries(route_k, config) if summaries is None else summaries.float()
    router_q = routing_queries(route_q, heads_kv) / (route_q.shape[2] // heads_kv)  # [B, R, Hkv, D]
    logits = torch.einsum("brhd,bnhd->bhrn", router_q, summ) * scale  # [B, Hkv, R, NS]
    logits = block_scores(logits, config, num_blocks)  # what routing ranks: [B, Hkv, R, NB]
    log_router = torch.log_softmax(logits.masked_fill(~candidate, float("-inf")), dim=-1)
    kl = torch.xlogy(target, target) - target * log_router.masked_fill(~candidate, 0.0)
    return kl.sum(-1).mean()
