"""A training signal for the attention itself: keep its dense softmax mass on the keys SSA selects.

Attention recall (:func:`subquad.attention_recall`) is the share of a query's dense softmax mass that
falls on the keys its selection attends to. A model trained under SSA never computes the rest of that
softmax, so nothing in the language-model loss stops mass from spreading over keys it never reads:
``nano-p4``'s recall at 32K was 0.62, and the best selection of its budget (the oracle of
``subquad.eval.recall``) would have reached 0.65 (``benchmarks/results/recall-loss-2026-11-24/``).
This loss, ``-log(recall)`` on a few query rows per sequence, trains the attention's q and k to put
the mass where the model looks. The selection itself is
discrete and gets no gradient; the router loss (:mod:`subquad.models.routing_loss`) is what moves it.

The scores are the layer's own: ``q . k`` for ``position_scheme="rope"`` (q and k arrive rotated);
for ``"local_rope"`` the keys of a token's local window are scored with rotated q and k and every other
key with unrotated ones, all in one softmax, as :func:`subquad.eval.recall.local_rope_recall` measures.
Cost per layer: ``rows x S`` scores per query head, small next to the layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def selection_recall_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    scale: float,
    rows: torch.Tensor,
    local_rotary: tuple[Rotate, int, int] | None = None,
) -> torch.Tensor | None:
    """``-log`` of the share of dense causal softmax mass on the selected keys, averaged over ``rows``,
    batch and query heads; differentiable in ``q`` and ``k``.

    q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` (self-attention); ``block_idx [B, Hkv, T, K]`` the
    selection's blocks (-1 padded; the query heads of a KV head share it); ``rows`` the query positions
    to score (long, any order). ``local_rotary = (rotate, sink_blocks, local_blocks)`` for ``local_rope``
    scores: ``rotate(x, positions)`` rotates ``x [..., D]`` by positions broadcastable to
    ``x.shape[:-1]``, and the selection's slots ``[sink_blocks, sink_blocks + local_blocks)`` hold the
    local window. Returns None when ``rows`` is empty.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q, k: expected self-attention (T == S), got T={q.shape[1]}, S={k.shape[1]}")
    if rows.numel() == 0:
        return None
    batch, seq_len, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    num_blocks = -(-seq_len // block_size)
    rows = rows.to(device=q.device, dtype=torch.long)
    key_pos = torch.arange(seq_len, device=q.device)
    key_block = key_pos // block_size
    causal = key_pos <= rows[:, None]  # [R, S]

    q_rows = q[:, rows].float().view(batch, -1, heads_kv, group, dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,R,D]
    keys = k.float().transpose(1, 2)  # [B, Hkv, S, D]
    scores = torch.einsum("bhgrd,bhsd->bhgrs", q_rows, keys) * scale

    picks = block_idx[:, :, rows].long()  # [B, Hkv, R, K]
    selected = _marked_blocks(picks, num_blocks)[..., key_block]  # [B, Hkv, R, S]

    scores = scores.masked_fill(~causal, float("-inf"))
    if local_rotary is None:
        total = scores.logsumexp(-1)
        inside = scores.masked_fill(~selected[:, :, None], float("-inf")).logsumexp(-1)
        return (total - inside).mean()

    # local_rope: the window's keys are scored rotated instead (gathered: at most local_blocks x
    # block_size of them per row); they are always selected.
    rotate, sink_blocks, local_blocks = local_rotary
    window = picks[..., sink_blocks : sink_blocks + local_blocks]  # [B, Hkv, R, L]
    offsets = torch.arange(block_size, device=q.device)
    window_pos = (window[..., None] * block_size + offsets).flatten(-2)  # [B, Hkv, R, L * bs]
    window_ok = (window >= 0).repeat_interleave(block_size, dim=-1) & (window_pos <= rows[:, None])
    gather = window_pos.clamp(0, seq_len - 1)
    k_window = keys.gather(2, gather.flatten(2)[..., None].expand(-1, -1, -1, dim))
    k_window = rotate(k_window.view(*gather.shape, dim), gather)
    q_rot = rotate(q_rows, rows.view(1, 1, 1, -1))
    local = torch.einsum("bhgrd,bhrkd->bhgrk", q_rot, k_window) * scale
    local = local.masked_fill(~window_ok[:, :, None], float("-inf"))
    in_window = _marked_blocks(window, num_blocks)[..., key_block]  # [B, Hkv, R, S]
    scores = scores.masked_fill(in_window[:, :, None], float("-inf"))
    window_lse = local.logsumexp(-1)  # finite with local_blocks > 0: a row's own key is in its window
    total = torch.logaddexp(scores.logsumexp(-1), window_lse)
    outside_window = scores.masked_fill(~selected[:, :, None], float("-inf"))
    inside = torch.logaddexp(outside_window.logsumexp(-1), window_lse)
    return (total - inside).mean()


def _marked_blocks(slots: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[..., NB]`` bool: True at the blocks named in ``slots [..., K]`` (-1: unused)."""
    # Unused slots scatter into a spare column that is dropped afterwards.
    spare = torch.where(slots >= 0, slots, num_blocks)
    marked = torch.zeros(*slots.shape[:-1], num_blocks + 1, dtype=torch.bool, device=slots.device)
    return marked.scatter(-1, spare, True)[..., :num_blocks]
