"""Public SSA entry points: input validation, backend dispatch, attention recall."""

from __future__ import annotations

import os
from typing import Any

import torch

from subquad.ops.ssa.config import SSAConfig, _check_int
from subquad.ops.ssa.naive import sparse_attention_naive
from subquad.ops.ssa.select import SSASelection, select_blocks

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_MAX_HEAD_DIM = 256


def ssa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SSAConfig | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_selection: bool = False,
    selection: SSASelection | None = None,
    summaries: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SSASelection]:
    """Selective sparse attention: each token attends exactly to the key blocks it selects.

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``; with
    ``causal``, ``T <= S`` and query ``i`` sits at position ``S - T + i`` (bottom-right), so chunked
    prefill and decoding are the same call.

    Args:
        config: block size and budget (:class:`SSAConfig`; default ``SSAConfig()``).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"torch"`` (reference, any device), ``"triton"`` (CUDA kernels; fp16/bf16) or
            ``"auto"`` (triton on CUDA for fp16/bf16, torch otherwise).
        return_selection: also return the :class:`SSASelection` used.
        selection: reuse a selection instead of routing (e.g. from an earlier call).
        summaries: precomputed routing summaries ``[B, ceil(S / config.summary_size), Hkv, D]`` (a KV
            cache's).

    Returns ``[B, T, Hq, Dv]`` in ``q.dtype`` (and the selection when asked). Gradients flow to q, k
    and v through the attention; the routing decision itself is not differentiated.
    """
    validate_qkv(q, k, v, causal=causal)
    config = _check_config(config)
    scale = _check_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q, v)
    if selection is None:
        if summaries is not None:
            _check_summaries(summaries, k, config.summary_size)
        with torch.no_grad():
            selection = select_blocks(q.detach(), k.detach(), config, causal=causal, summaries=summaries)
    else:
        _check_selection(selection, q, k)
    if backend == "torch":
        out = sparse_attention_naive(q, k, v, selection.block_idx, selection.block_size, causal, scale)
    else:
        from subquad.ops.ssa.triton_attention import sparse_attention_triton

        out = sparse_attention_triton(
            q,
            k,
            v,
            selection.block_idx,
            selection.block_size,
            causal,
            scale,
            selection.num_fixed_slots,
            selection.fixed_layout,
        )
    return (out, selection) if return_selection else out


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """Turn ``"auto"`` into a concrete backend, or say why the one asked for cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        usable = q.is_cuda and q.dtype in _TRITON_DTYPES and triton_unavailable_reason(q, v) is None
        return "triton" if usable else "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(q, v)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}; use backend='torch'")
    return backend


def triton_unavailable_reason(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None if they can."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpret):
        return f"tensors are on {q.device}, the kernels need CUDA (or TRITON_INTERPRET=1 for CPU checks)"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported, expected float16 or bfloat16"
    for name, dim in (("q/k head dim", q.shape[-1]), ("v head dim", v.shape[-1])):
        if dim > _TRITON_MAX_HEAD_DIM or dim < 16:
            return f"{name}={dim} is not supported, expected 16 <= D <= {_TRITON_MAX_HEAD_DIM}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'subquad[triton]')"
    return None


def validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> None:
    """Raise a readable TypeError/ValueError for any q, k, v that SSA or dense attention cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dims [batch, seq, heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported, expected one of {_FLOAT_DTYPES}")
        if 0 in t.shape:
            raise ValueError(f"{name}: empty tensor of shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: on different devices {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v lengths differ: k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v head counts differ: k {k.shape[2]}, v {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r}: expected a bool")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(
            f"q length {q.shape[1]} > k length {k.shape[1]}: causal attention is bottom-right aligned "
            "and needs T <= S"
        )


def _check_config(config: SSAConfig | None) -> SSAConfig:
    if config is None:
        return SSAConfig()
    if not isinstance(config, SSAConfig):
        raise TypeError(f"config: expected an SSAConfig, got {type(config).__name__}")
    return config


def _check_scale(scale: float | None, dim: int) -> float:
    if scale is None:
        return dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale={scale!r}: expected a float or None")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale={scale!r}: expected a finite positive float")
    return float(scale)


def _check_selection(selection: SSASelection, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(selection, SSASelection):
        raise TypeError(f"selection: expected an SSASelection, got {type(selection).__name__}")
    _check_int("selection.block_size", selection.block_size, minimum=1)
    idx = selection.block_idx
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"selection.block_idx: expected a torch.Tensor, got {type(idx).__name__}")
    want = (q.shape[0], k.shape[2], q.shape[1])
    if idx.dim() != 4 or tuple(idx.shape[:3]) != want:
        raise ValueError(f"selection.block_idx: shape {tuple(idx.shape)}, expected {want + ('K',)}")
    if idx.dtype != torch.int32:
        raise TypeError(f"selection.block_idx: dtype {idx.dtype}, expected torch.int32")
    if selection.num_fixed_slots is not None:
        _check_int("selection.num_fixed_slots", selection.num_fixed_slots, minimum=0)
        if selection.num_fixed_slots > idx.shape[-1]:
            raise ValueError(
                f"selection.num_fixed_slots={selection.num_fixed_slots}: expected at most K={idx.shape[-1]}"
            )
    if idx.device != q.device:
        raise ValueError(f"selection.block_idx: on {idx.device}, expected {q.device}")
    num_blocks = -(-k.shape[1] // selection.block_size)
    if idx.numel() and (int(idx.max()) >= num_blocks or int(idx.min()) < -1):
        raise ValueError(f"selection.block_idx: entries must lie in [-1, {num_blocks - 1}]")
    # A repeated block would be attended twice (its keys counted twice in the softmax).
    ordered = idx.sort(dim=-1).values
    repeated = ordered[..., 1:][(ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)]
    if repeated.numel():
        raise ValueError(
            f"selection.block_idx: a row repeats block {int(repeated[0])}; "
            "valid entries of a row must be distinct"
        )


def _check_summaries(summaries: torch.Tensor, k: torch.Tensor, summary_size: int) -> None:
    want = (k.shape[0], -(-k.shape[1] // summary_size), k.shape[2], k.shape[3])
    if not isinstance(summaries, torch.Tensor) or tuple(summaries.shape) != want:
        got = tuple(summaries.shape) if isinstance(summaries, torch.Tensor) else type(summaries).__name__
        raise ValueError(f"summaries: got {got}, expected shape {want}")
    if not summaries.is_floating_point():
        raise TypeError(f"summaries: dtype {summaries.dtype}, expected a floating point dtype")
    if summaries.device != k.device:
        raise ValueError(f"summaries: on {summaries.device}, expected {k.device} (the device of k)")


def check_max_queries(max_queries: Any) -> None:
    """``max_queries``: a positive int, or None for every query."""
    if max_queries is not None and (
        isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1
    ):
        raise ValueError(f"max_queries={max_queries!r}: expected a positive int or None")


def query_rows(seq_len_q: int, max_queries: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Query rows a recall evaluates: all of them, or ``max_queries`` evenly spaced ones."""
    check_max_queries(max_queries)
    rows = torch.arange(seq_len_q, device=device)
    if max_queries is not None and max_queries < seq_len_q:
        rows = torch.linspace(0, seq_len_q - 1, max_queries, device=device).round().long().unique()
    return rows


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: SSASelection,
    causal: bool = True,
    scale: float | None = None,
    max_queries: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Share of dense softmax mass that falls inside the selection.

    Computed blockwise (per-block log-sum-exp over key chunks), so no ``[T, S]`` tensor is formed.
    ``max_queries`` evaluates an evenly spaced subset of query positions (dense mass costs
    ``O(T * S)``; a subset keeps 128K contexts affordable on a CPU). ``reduction="mean"`` returns a
    scalar tensor; ``"none"`` returns ``[B, T', Hq]`` for the evaluated queries.
    """
    validate_qkv(q, k, k, causal=causal)
    _check_selection(selection, q, k)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = _check_scale(scale, dim)
    bs = selection.block_size
    num_blocks = -(-seq_len_k // bs)
    rows = query_rows(seq_len_q, max_queries, q.device)
    positions = rows + (seq_len_k - seq_len_q)
    pad = num_blocks * bs - seq_len_k
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad)).permute(0, 2, 3, 1)  # [B, Hkv, D, S']
    key_pos = torch.arange(num_blocks * bs, device=q.device)
    key_chunk_blocks = max(1, (1 << 14) // bs)
    query_chunk = max(1, (1 << 25) // max(1, batch * heads_q * key_chunk_blocks * bs))
    out = []
    for start in range(0, rows.numel(), query_chunk):
        r = rows[start : start + query_chunk]
        p = positions[start : start + query_chunk]
        qc = q[:, r].float().view(batch, -1, heads_kv, group, dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,Tc,D]
        block_lse = []
        for kb in range(0, num_blocks, key_chunk_blocks):
            ke = min(num_blocks, kb + key_chunk_blocks)
            s = torch.matmul(qc, kf[:, :, None, :, kb * bs : ke * bs]) * scale  # [B,Hkv,G,Tc,Sc]
            invalid = key_pos[kb * bs : ke * bs] >= seq_len_k
            if causal:
                invalid = invalid | (key_pos[kb * bs : ke * bs] > p[:, None])
            s = s.masked_fill(invalid, float("-inf"))
            block_lse.append(s.view(*s.shape[:-1], ke - kb, bs).logsumexp(-1))
        lse_blocks = torch.cat(block_lse, dim=-1)  # [B, Hkv, G, Tc, NB]
        total = lse_blocks.logsumexp(-1)
        idx = selection.block_idx[:, :, r].long()  # [B, Hkv, Tc, K]
        picked = lse_blocks.gather(-1, idx.clamp(min=0)[:, :, None].expand(-1, -1, group, -1, -1))
        picked = picked.masked_fill((idx < 0)[:, :, None], float("-inf"))
        recall = (picked.logsumexp(-1) - total).exp()  # [B, Hkv, G, Tc]
        out.append(recall.permute(0, 3, 1, 2).reshape(batch, -1, heads_q))
    result = torch.cat(out, dim=1)
    return result.mean() if reduction == "mean" else result
