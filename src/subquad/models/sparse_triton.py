"""The ``local_rope`` position scheme on the Triton SSA kernels.

Under ``local_rope`` a token scores the keys of its local window with rotated q and k, and its sink
and routed keys with the unrotated ones, all in one softmax (``sparse_torch.py`` is the reference).
The kernels take one q and one k, so the selection is split in two parts that each run unchanged:

* **local**: the local slots, rotated q against rotated keys. Only the keys from the first query's
  local window onwards are rotated (a cache of millions of keys is never copied), with block ids
  shifted to that tail; query positions stay bottom-right aligned, so the causal mask is unchanged.
* **far**: the sink and routed slots, unrotated (key-major for long prompts, as ``ssa_attention``).

The two partial results are merged with their log-sum-exps. The backward needs no merge rule of
its own: each part's backward, given the *merged* output and log-sum-exp, yields the exact gradient
(``p = exp(s - lse)`` is then the global probability, and ``delta = do . out`` the global row term).
"""

from __future__ import annotations

import torch

from subquad.ops.ssa.tiles import QueryTiles
from subquad.ops.ssa.triton_attention import (
    sparse_attention_bwd,
    sparse_attention_fwd,
    use_routed_forward,
)
from subquad.ops.ssa.triton_routed import fixed_part, sparse_attention_bwd_routed, sparse_attention_fwd_routed


def split_local_slots(
    block_idx: torch.Tensor, block_size: int, sink_slots: int, local_slots: int, seq_len_k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``block_idx [B, Hkv, T, K]`` (``select_blocks`` layout) -> (local ids relative to the tail, far
    ids with sinks first, the tail's first key).

    The tail starts at the first query's local window: its block minus ``local_slots - 1``, derived
    from the shapes (bottom-right alignment), so no device sync is needed.
    """
    seq_len_q = block_idx.shape[2]
    first_block = max(0, (seq_len_k - seq_len_q) // block_size - local_slots + 1)
    local = block_idx[..., sink_slots : sink_slots + local_slots]
    far = torch.cat([block_idx[..., :sink_slots], block_idx[..., sink_slots + local_slots :]], dim=-1)
    local = torch.where(local >= 0, local - first_block, local)
    return local.contiguous(), far.contiguous(), first_block * block_size


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from two disjoint key sets: outs ``[B, T, H, Dv]``, lse ``[B, T, H]`` in log2 units
    (``+inf`` = the part saw no key). Returns (out in ``out_a.dtype``, merged lse, ``+inf`` if none)."""
    la = torch.where(torch.isinf(lse_a), float("-inf"), lse_a)
    lb = torch.where(torch.isinf(lse_b), float("-inf"), lse_b)
    top = torch.maximum(la, lb)
    top_safe = torch.where(torch.isinf(top), 0.0, top)
    wa, wb = torch.exp2(la - top_safe), torch.exp2(lb - top_safe)
    total = wa + wb
    seen = total > 0
    total_safe = torch.where(seen, total, 1.0)
    out = (out_a.float() * (wa / total_safe)[..., None] + out_b.float() * (wb / total_safe)[..., None]).to(
        out_a.dtype
    )
    lse = torch.where(seen, top_safe + torch.log2(total_safe), float("inf"))
    return out, lse


class LocalRotaryAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, q_rot, k_rot_tail, v, local_idx, far_idx, tail_start, block_size, scale, num_sinks, layout
    ):
        q, k, q_rot, k_rot_tail, v = (t.contiguous() for t in (q, k, q_rot, k_rot_tail, v))
        v_tail = v[:, tail_start:]
        local_tiles = far_layout = None
        if layout is not None:  # every layer of a prefill chunk has the same sink and local slots
            local_layout, far_layout = (*layout, "local"), (*layout, "far")
            num_local, group = local_idx.shape[-1], q.shape[2] // k.shape[2]
            local_tiles = fixed_part(local_idx, num_local, group, k.shape[1], block_size, local_layout).tiles
        out_a, lse_a, tiles_a = sparse_attention_fwd(
            q_rot, k_rot_tail, v_tail, local_idx, block_size, True, scale, local_tiles
        )
        ctx.plan = None
        routed = use_routed_forward(q.shape[1], far_idx.shape[-1], num_sinks)
        if routed:
            # The backward goes key-major too, on the forward's work lists (kept only for training).
            keep = any(ctx.needs_input_grad[:5])
            out_b, lse_b, ctx.plan = sparse_attention_fwd_routed(
                q, k, v, far_idx, block_size, True, scale, num_sinks, keep_plan=keep, fixed_layout=far_layout
            )
            far_tiles = ()
        else:
            out_b, lse_b, tiles_b = sparse_attention_fwd(q, k, v, far_idx, block_size, True, scale)
            far_tiles = (tiles_b.blocks, tiles_b.masks, tiles_b.count)
        out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
        local_tiles = (tiles_a.blocks, tiles_a.masks, tiles_a.count)
        ctx.save_for_backward(q, k, q_rot, k_rot_tail, v, out, lse, far_idx, *local_tiles, *far_tiles)
        ctx.meta = (tail_start, block_size, scale, tiles_a.tokens_per_tile, num_sinks, routed)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, q_rot, k_rot_tail, v, out, lse, far_idx, *tile_tensors = ctx.saved_tensors
        tail_start, block_size, scale, tokens, num_sinks, routed = ctx.meta
        tiles_a = QueryTiles(*tile_tensors[:3], tokens)
        v_tail = v[:, tail_start:]
        dq_rot, dk_rot_tail, dv_tail = sparse_attention_bwd(
            do, q_rot, k_rot_tail, v_tail, out, lse, tiles_a, block_size, True, scale
        )
        if routed:  # the plan is used once (a second backward, retain_graph=True, rebuilds it)
            dq, dk, dv = sparse_attention_bwd_routed(
                do, q, k, v, out, lse, far_idx, block_size, True, scale, num_sinks, plan=ctx.plan
            )
            ctx.plan = None
        else:
            tiles_b = QueryTiles(*tile_tensors[3:], tokens)
            dq, dk, dv = sparse_attention_bwd(do, q, k, v, out, lse, tiles_b, block_size, True, scale)
        dv[:, tail_start:] += dv_tail
        return dq, dk, dq_rot, dk_rot_tail, dv, None, None, None, None, None, None, None


def sparse_attention_local_rotary_triton(
    q, k, v, block_idx, block_size, scale, rotate, sink_slots, local_slots, fixed_layout=None
):
    """Triton twin of ``sparse_attention_torch(..., causal=True, local_rotary=(rotate, sink_slots,
    local_slots))``: q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` unrotated
    (fp16/bf16, CUDA); ``block_idx [B, Hkv, T, K]`` in ``select_blocks`` layout (sinks, local, routed).
    Query ``i`` sits at position ``S - T + i``. Returns ``[B, T, Hq, Dv]``. ``fixed_layout``
    (``SSASelection.fixed_layout``) lets the sink and local slots' work lists come from a cache
    (``triton_routed.fixed_part``), shared by the layers of a prefill chunk."""
    seq_len_q, seq_len_k = q.shape[1], k.shape[1]
    local_idx, far_idx, tail_start = split_local_slots(
        block_idx, block_size, sink_slots, local_slots, seq_len_k
    )
    q_pos = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=q.device)
    k_pos = torch.arange(tail_start, seq_len_k, device=q.device)
    q_rot = rotate(q, q_pos[None, :, None])
    k_rot_tail = rotate(k[:, tail_start:], k_pos[None, :, None])
    return LocalRotaryAttentionFunction.apply(
        q, k, q_rot, k_rot_tail, v, local_idx, far_idx, tail_start, block_size, scale, sink_slots,
        fixed_layout,
    )  # fmt: skip
