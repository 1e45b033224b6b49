"""Sparse attention over a block selection with the extras models need, in plain PyTorch.

``subquad.ssa_attention`` covers plain SSA (and runs the Triton kernels on CUDA). Two model
features change the scores themselves, so they run here, on the torch path:

* ``local_rotary``: the ``local_rope`` position scheme. Keys in the query's local window are scored
  with rotated queries and keys, sink and routed keys with the unrotated ones, all in one softmax.
* ``sliding_window``: transformers models trained with a sliding window (Mistral, Qwen2) keep it:
  a key more than ``window - 1`` positions back is masked even when its block is selected.

Same chunking as ``ops/ssa/naive.py``: a chunk of queries gathers its selected keys, no ``[T, S]``
tensor is formed, and under autograd the gathered keys are recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from subquad.ops.ssa.naive import chunk_elements, gather_blocks, key_blocks

# rotate(x, positions) -> x rotated: x [..., N, D], positions broadcastable to [..., N].
Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    local_rotary: tuple[Rotate, int, int] | None = None,
) -> torch.Tensor:
    """Exact softmax attention over each token's selected blocks.

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; block_idx ``[B, Hkv, T, K]``
    (``SSASelection.block_idx``). Query ``i`` sits at position ``S - T + i``; key ``j`` at ``j``.
    ``sliding_window``: also mask keys at ``pos <= query_pos - window``.
    ``local_rotary``: ``(rotate, first_slot, num_slots)``: selection slots ``[first_slot, first_slot +
    num_slots)`` (the local window, see ``SSASelection``) are scored as ``rotate(q) . rotate(k)`` at
    their positions; the other slots as ``q . k`` (q, k unrotated).
    Returns ``[B, T, Hq, Dv]`` in ``q.dtype``.
    """
    batch, seq_len_q, _, dim = q.shape
    keys_per_token = block_idx.shape[-1] * block_size
    per_token = batch * k.shape[2] * keys_per_token * max(dim, v.shape[-1])
    chunk = max(1, chunk_elements(q.device) // max(1, per_token))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # Whole blocks are copied per selected slot (rows of block_size x D), not single elements.
    k_blocks, v_blocks = key_blocks(k, block_size), key_blocks(v, block_size)
    out = []
    for start in range(0, seq_len_q, chunk):
        stop = min(seq_len_q, start + chunk)
        first_pos = k.shape[1] - seq_len_q + start
        args = (
            q[:, start:stop],
            k_blocks,
            v_blocks,
            k.shape[1],
            block_idx[:, :, start:stop],
            block_size,
            scale,
            causal,
            first_pos,
            sliding_window,
            local_rotary,
        )
        if needs_grad:
            out.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            out.append(_chunk(*args))
    return torch.cat(out, dim=1)


def _chunk(
    q,
    k_blocks,
    v_blocks,
    seq_len_k,
    block_idx,
    block_size,
    scale,
    causal,
    first_pos,
    sliding_window,
    local_rotary,
):
    batch, chunk, heads_q, dim = q.shape
    heads_kv = block_idx.shape[1]
    group = heads_q // heads_kv
    idx = block_idx.long()
    key_pos = (idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
    valid = (idx >= 0).repeat_interleave(block_size, dim=-1) & (key_pos < seq_len_k)
    query_pos = torch.arange(first_pos, first_pos + chunk, device=q.device)
    if causal:
        valid &= key_pos <= query_pos[:, None]
    if sliding_window is not None:
        valid &= key_pos > query_pos[:, None] - sliding_window
    kg, vg = gather_blocks(k_blocks, v_blocks, idx)
    qh = q.float().view(batch, chunk, heads_kv, group, dim).permute(0, 2, 1, 3, 4)  # [B, Hkv, Tc, G, D]
    if local_rotary is None:
        scores = torch.matmul(qh, kg.transpose(-1, -2))  # [B, Hkv, Tc, G, K * bs]
    else:
        # The local slots score rotated q against rotated keys, the others q . k: each slot once.
        rotate, first_slot, local_slots = local_rotary
        lo, hi = first_slot * block_size, (first_slot + local_slots) * block_size
        k_local = _rotated_local_keys(k_blocks, idx[..., first_slot : first_slot + local_slots], rotate)
        q_rot = rotate(qh, query_pos.view(1, 1, chunk, 1).expand(batch, heads_kv, chunk, group))
        scores = torch.cat(
            [
                torch.matmul(qh, kg[..., :lo, :].transpose(-1, -2)),
                torch.matmul(q_rot, k_local.transpose(-1, -2)),
                torch.matmul(qh, kg[..., hi:, :].transpose(-1, -2)),
            ],
            dim=-1,
        )
    scores = (scores * scale).masked_fill(~valid[:, :, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, vg)  # [B, Hkv, Tc, G, Dv]
    return out.permute(0, 2, 1, 3, 4).reshape(batch, chunk, heads_q, -1).to(q.dtype)


def _rotated_local_keys(k_blocks: torch.Tensor, local_idx: torch.Tensor, rotate: Rotate) -> torch.Tensor:
    """Keys of the local slots rotated at their positions: ``[B, Hkv, Tc, L * bs, D]``.

    A chunk's local windows overlap, so the span of blocks they name is rotated once and then copied
    per token: rotating the copies would cost ``Tc * L * bs`` rotary angles instead of ``~(Tc + L
    bs)``. ``k_blocks``: the :func:`key_blocks` table; ``local_idx``: ``[B, Hkv, Tc, L]`` (-1 slots read
    the span's first block: mask them).
    """
    batch, heads_kv, chunk, local_slots = local_idx.shape
    block_size, dim = k_blocks.shape[1], k_blocks.shape[2]
    named = local_idx[local_idx >= 0]
    first, stop = (int(named.min()), int(named.max()) + 1) if named.numel() else (0, 1)
    span = k_blocks.view(batch * heads_kv, -1, block_size, dim)[:, first:stop]
    positions = torch.arange(first * block_size, stop * block_size, device=k_blocks.device)
    width = stop - first
    rotated = rotate(span, positions.view(1, width, block_size)).reshape(-1, block_size, dim)
    owner = torch.arange(batch * heads_kv, device=local_idx.device).view(batch, heads_kv, 1, 1) * width
    rows = (owner + (local_idx - first).clamp(min=0)).flatten()
    return rotated.index_select(0, rows).view(batch, heads_kv, chunk, local_slots * block_size, dim)
