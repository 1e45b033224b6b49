"""The coarse context term of a Subquad model (``SubquadConfig.coarse_span``).

SSA attends exactly to the sink, the local window and ``top_k`` routed blocks; everything else in the
context is invisible to the query. The dense twin's advantage past 4K tokens is spread thinly over many
blocks (``benchmarks/NOTES.md`` items 59-61), which no affordable ``top_k`` reaches. The coarse term
gives each query the rest of its context in summary: every complete span of ``span`` tokens that ends
before the query's local window is one entry, its key the span's mean (pre-rotary) key and its value the
span's mean value, each through a learned ``D x D`` map. The query attends to these entries in a softmax
of its own, beside a null entry (zero key and value: score 0, contributes nothing), so a query can put
its coarse mass nowhere. The result is added to the sparse attention's output.

Cost: ``S / span`` entries per query, like the flat router's ``S / block_size`` scores, so it is
sub-quadratic only by the factor ``span``. It is causal by construction: an entry only summarises keys
that are earlier than the query's window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Elements of the largest boolean mask one SDPA call builds (queries are chunked to stay under it).
_MASK_ELEMENTS = 1 << 26


def coarse_entries(
    k: torch.Tensor, v: torch.Tensor, span: int, key_map: nn.Linear, value_map: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """The null entry and one entry per complete span: keys and values ``[B, 1 + S // span, Hkv, D]``.

    ``k, v [B, S, Hkv, D]`` (keys pre-rotary); a span's mean is taken in float32, then mapped.
    """
    batch, seq_len, heads, _ = k.shape
    spans = seq_len // span
    outs = []
    for x, mapping in ((k, key_map), (v, value_map)):
        means = x[:, : spans * span].reshape(batch, spans, span, heads, x.shape[-1]).float().mean(2)
        mapped = mapping(means.to(mapping.weight.dtype)).to(x.dtype)
        outs.append(torch.cat([mapped.new_zeros(batch, 1, heads, mapped.shape[-1]), mapped], dim=1))
    return outs[0], outs[1]


def coarse_visible(
    query_positions: torch.Tensor, num_entries: int, span: int, block_size: int, local_blocks: int
) -> torch.Tensor:
    """``[T, num_entries]`` bool: which entries (null first, then spans) each query position sees.

    Span ``j`` is visible to position ``p`` when it ends at or before the first key of ``p``'s local
    window, the ``local_blocks`` blocks of ``block_size`` ending with ``p``'s own.
    """
    window_start = ((query_positions // block_size) - (local_blocks - 1)).clamp(min=0) * block_size
    span_end = torch.arange(num_entries, device=query_positions.device) * span  # entry j >= 1: span j - 1
    visible = span_end[None, :] <= window_start[:, None]
    visible[:, 0] = True
    return visible


def coarse_context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: int,
    block_size: int,
    local_blocks: int,
    scale: float,
    key_map: nn.Linear,
    value_map: nn.Linear,
) -> torch.Tensor:
    """The coarse term for the last ``T`` of ``S`` positions (bottom-right aligned).

    q ``[B, T, Hq, D]`` pre-rotary queries; k, v ``[B, S, Hkv, D]`` (keys pre-rotary). Returns
    ``[B, T, Hq, Dv]`` in q's dtype. Differentiable in q, k, v and both maps.
    """
    batch, steps, heads_q, _ = q.shape
    seq_len, heads_kv = k.shape[1], k.shape[2]
    keys, values = coarse_entries(k, v, span, key_map, value_map)
    groups = heads_q // heads_kv
    kt = keys.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, Hq, 1 + n, D]
    vt = values.transpose(1, 2).repeat_interleave(groups, dim=1)
    qt = q.transpose(1, 2)
    positions = torch.arange(seq_len - steps, seq_len, device=q.device)
    chunk = max(1, _MASK_ELEMENTS // kt.shape[2])
    outs = []
    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        mask = coarse_visible(positions[start:stop], kt.shape[2], span, block_size, local_blocks)
        outs.append(F.scaled_dot_product_attention(qt[:, :, start:stop], kt, vt, attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2)
