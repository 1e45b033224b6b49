"""Dense softmax attention in plain PyTorch: the oracle every SSA test compares against."""

from __future__ import annotations

import torch

# Scores held at once per chunk of queries (fp32 elements): keeps 128K-token references on the CPU.
_CHUNK_ELEMENTS = 1 << 26


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention, computed in float32 a chunk of queries at a time.

    q: ``[B, T, Hq, D]``, k: ``[B, S, Hkv, D]``, v: ``[B, S, Hkv, Dv]``, ``Hq % Hkv == 0``, ``T <= S``.
    Causal alignment is bottom-right: query ``i`` sits at position ``S - T + i``.
    Returns ``[B, T, Hq, Dv]`` in ``q.dtype``.
    """
    from subquad.ops.ssa.interface import _check_scale, validate_qkv

    validate_qkv(q, k, v, causal=causal)
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = _check_scale(scale, dim)
    kf = k.float().permute(0, 2, 3, 1)  # [B, Hkv, D, S]
    vf = v.float().transpose(1, 2)  # [B, Hkv, S, Dv]
    key_pos = torch.arange(seq_len_k, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads_q * seq_len_k))
    out = []
    for start in range(0, seq_len_q, chunk):
        stop = min(seq_len_q, start + chunk)
        qc = q[:, start:stop].float().view(batch, stop - start, heads_kv, group, dim).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qc, kf[:, :, None]) * scale  # [B, Hkv, G, Tc, S]
        if causal:
            query_pos = torch.arange(start, stop, device=q.device) + (seq_len_k - seq_len_q)
            scores.masked_fill_(key_pos > query_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        oc = torch.matmul(probs, vf[:, :, None])  # [B, Hkv, G, Tc, Dv]
        out.append(oc.permute(0, 3, 1, 2, 4).reshape(batch, stop - start, heads_q, -1))
    return torch.cat(out, dim=1).to(q.dtype)
