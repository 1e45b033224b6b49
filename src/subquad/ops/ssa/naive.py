"""Sparse attention over a given block selection, in plain PyTorch (any device, differentiable).

Same signature as the Triton kernel (``triton_fwd.sparse_attention_triton``). Each query token
gathers the keys of its own selected blocks, so memory per chunk of queries is
``O(chunk * K * block_size * D)``: no ``[T, S]`` tensor, 128K tokens run on a CPU.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Gathered key elements per chunk of queries (fp32). On a GPU, large chunks (256 MiB for keys and as
# much for values) save launches. On the CPU a temporary of 32 MiB or more gets an mmap of its own
# (glibc's largest mmap threshold) and every chunk page-faults it afresh: 8 MiB chunks stay in the
# heap (16K tokens: 7.6-10.9 s with 2^26 against 2.7-3.5 s; benchmarks/NOTES.md item 38).
_CHUNK_ELEMENTS = 1 << 26
_CPU_CHUNK_ELEMENTS = 1 << 21


def chunk_elements(device: torch.device) -> int:
    """Gathered elements per chunk of queries on ``device``."""
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS


def sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to each token's selected key blocks.

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``;
    block_idx: ``[B, Hkv, T, K]`` int32, ``-1`` for unused slots (shared by the ``Hq // Hkv`` query
    heads of a KV head). With ``causal``, keys after the token's position ``S - T + i`` are masked.
    Returns ``[B, T, Hq, Dv]`` in ``q.dtype``, accumulated in float32.
    """
    batch, seq_len_q, heads_q, dim = q.shape
    num_slots = block_idx.shape[-1]
    per_token = batch * k.shape[2] * num_slots * block_size * max(dim, v.shape[-1])
    chunk = max(1, chunk_elements(q.device) // max(1, per_token))
    scale = dim**-0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # Keys and values as [B * Hkv * NB, block_size, D] rows, converted once for all chunks.
    k_blocks, v_blocks = key_blocks(k, block_size), key_blocks(v, block_size)
    out = []
    for start in range(0, seq_len_q, chunk):
        stop = min(seq_len_q, start + chunk)
        # Absolute position of the chunk's first query under bottom-right alignment.
        first_pos = k.shape[1] - seq_len_q + start
        args = (
            q[:, start:stop],
            k_blocks,
            v_blocks,
            block_idx[:, :, start:stop],
            block_size,
            k.shape[1],
            causal,
            scale,
            first_pos,
        )
        if needs_grad:
            # Recompute the gathered keys in backward instead of keeping them for every chunk.
            out.append(checkpoint(_sparse_attention_chunk, *args, use_reentrant=False))
        else:
            out.append(_sparse_attention_chunk(*args))
    return torch.cat(out, dim=1)


def key_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B * H * NB, block_size, D]`` float32, zero-padded to whole blocks."""
    batch, seq_len, heads, dim = x.shape
    num_blocks = -(-seq_len // block_size)
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, num_blocks * block_size - seq_len))
    return (
        x.view(batch, num_blocks, block_size, heads, dim).permute(0, 3, 1, 2, 4).reshape(-1, block_size, dim)
    )


def gather_blocks(
    k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every selected block: ``[B, Hkv, Tc, K * bs, D]`` each, from the
    :func:`key_blocks` tables and ``block_idx [B, Hkv, Tc, K]`` (``-1`` slots read block 0: mask them)."""
    batch, heads_kv, chunk, num_slots = block_idx.shape
    num_blocks, block_size = k_blocks.shape[0] // (batch * heads_kv), k_blocks.shape[1]
    # Row of each selected block in the [B * Hkv * NB] block table.
    owner = torch.arange(batch * heads_kv, device=block_idx.device).view(batch, heads_kv, 1, 1) * num_blocks
    rows = (owner + block_idx.clamp(min=0)).flatten()
    kg = k_blocks.index_select(0, rows).view(batch, heads_kv, chunk, num_slots * block_size, -1)
    vg = v_blocks.index_select(0, rows).view(batch, heads_kv, chunk, num_slots * block_size, -1)
    return kg, vg


def _sparse_attention_chunk(
    q, k_blocks, v_blocks, block_idx, block_size, seq_len_k, causal, scale, first_pos
):
    batch, chunk, heads_q, dim = q.shape
    heads_kv = block_idx.shape[1]
    group = heads_q // heads_kv
    idx = block_idx.long()
    # [B, Hkv, Tc, K * bs] absolute key positions of every selected slot.
    key_pos = (idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
    valid = (idx >= 0).repeat_interleave(block_size, dim=-1) & (key_pos < seq_len_k)
    if causal:
        query_pos = torch.arange(first_pos, first_pos + chunk, device=q.device)
        valid &= key_pos <= query_pos[:, None]
    kg, vg = gather_blocks(k_blocks, v_blocks, idx)
    qh = q.float().view(batch, chunk, heads_kv, group, dim).permute(0, 2, 1, 3, 4)  # [B, Hkv, Tc, G, D]
    scores = torch.matmul(qh, kg.transpose(-1, -2)) * scale  # [B, Hkv, Tc, G, K * bs]
    scores = scores.masked_fill(~valid[:, :, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, vg)  # [B, Hkv, Tc, G, Dv]
    return out.permute(0, 2, 1, 3, 4).reshape(batch, chunk, heads_q, -1).to(q.dtype)
