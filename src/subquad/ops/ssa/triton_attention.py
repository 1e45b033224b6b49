"""Triton kernels for sparse attention over a per-token block selection: forward and backward.

Layout as ``naive.sparse_attention_naive`` (same signature). A program owns one query tile: the
``Hq // Hkv`` query heads of ``tokens_per_tile`` consecutive tokens of one KV head, as
``BLOCK_M`` rows (row = token * group + head). It walks the sorted union of the tile's selected key
blocks (``tiles.build_query_tiles``); a per-block bitmask keeps each row to its own token's
selection, so the result is per-token exact. Online softmax in fp32, log2 domain.

Backward (FlashAttention-2 split): dQ by query tile over the same union; dK/dV by key block over the
query tiles that hold it (``tiles.invert_tiles``), segments of one block summed with one fp32 atomic
add each. Long sequences run their routed slots key-major instead, forward and backward
(``triton_routed``; :func:`use_routed_forward` decides).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from subquad.ops.ssa.tiles import QueryTiles, build_query_tiles, invert_tiles

_LOG2E = 1.4426950408889634
_ROWS_PER_TILE = 64
# Query length from which the forward runs routed slots key-major (when the fixed slots are known).
ROUTED_MIN_TOKENS = 16384


def _fix_interpreter_scalar_index() -> None:
    """Let CPU interpreter runs (TRITON_INTERPRET=1) use loaded scalars as loop bounds.

    Triton 3.6's interpreter turns a loaded scalar into ``int`` with ``int(array)``, which NumPy 2
    refuses for the 1-element arrays it holds. Only the interpreter is touched; GPU runs never are.
    """
    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "subquad_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.subquad_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()


def tokens_per_tile(group: int, rows: int = _ROWS_PER_TILE) -> int:
    """Tokens in one query tile so that ``tokens * group`` fills about ``rows`` matrix rows."""
    return max(1, min(64, rows // group))


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """``2 ** x``. ``FAST`` (``fused.inline_ptx``): PTX's ``ex2.approx.ftz.f32``, one MUFU instruction;
    ``tl.math.exp2`` is the non-flushing ``ex2.approx.f32``, which ptxas wraps in more instructions to
    scale inputs below -126. Results under 2**-126 become 0, nothing beside a softmax row's largest term
    (1)."""
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.math.exp2(x)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """``log2(x)`` for ``x`` > 0. ``FAST`` (``fused.inline_ptx``): PTX's ``lg2.approx.ftz.f32``, one MUFU
    instruction (absolute error ~2**-22); ``tl.math.log2`` is a ~20-instruction polynomial."""
    if FAST:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.math.log2(x)


@triton.jit
def _tile_rows(tile, group, T, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row -> (token within tile, head within group, absolute query index, row valid)."""
    rows = tl.arange(0, BLOCK_M)
    token_in_tile = rows // group
    head = rows % group
    token = tile * TOKENS + token_in_tile
    valid = (token_in_tile < TOKENS) & (token < T)
    return token_in_tile, head, token, valid


@triton.jit
def _sparse_attention_fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    tile_blocks,
    tile_masks,
    tile_count,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    S,
    HKV,
    group,
    num_tiles,
    union_width,
    scale_log2,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    token_in_tile, head, token, row_ok = _tile_rows(tile, group, T, TOKENS, BLOCK_M)
    q_head = h * group + head
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + token.to(tl.int64)[:, None] * stride_qt
        + q_head[:, None] * stride_qh
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    query_pos = token + (S - T)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    list_base = (bh.to(tl.int64) * num_tiles + tile) * union_width
    count = tl.load(tile_count + bh.to(tl.int64) * num_tiles + tile)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    for u in range(0, count):
        block = tl.load(tile_blocks + list_base + u)
        bits = tl.load(tile_masks + list_base + u)
        key_pos = block * BLOCK_N + offs_n
        key_ok = key_pos < S
        k = tl.load(
            k_base + key_pos.to(tl.int64)[None, :] * stride_ks + offs_d[:, None],
            mask=key_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        v = tl.load(
            v_base + key_pos.to(tl.int64)[:, None] * stride_vs + offs_dv[None, :],
            mask=key_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        s = tl.dot(q, k) * scale_log2
        chosen = ((bits >> token_in_tile.to(tl.int64)) & 1) != 0
        visible = chosen[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (
        OUT
        + b.to(tl.int64) * stride_ob
        + token.to(tl.int64)[:, None] * stride_ot
        + q_head[:, None] * stride_oh
        + offs_dv[None, :]
    )
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    # LSE (log2 domain) laid out [B, T, Hq] like the rows of q.
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    lse_ptrs = LSE + (b.to(tl.int64) * T + token) * (HKV * group) + q_head
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _sparse_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    tile_blocks,
    tile_masks,
    tile_count,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    T,
    S,
    HKV,
    group,
    num_tiles,
    union_width,
    scale_log2,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    token_in_tile, head, token, row_ok = _tile_rows(tile, group, T, TOKENS, BLOCK_M)
    q_head = h * group + head
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    row_off = (
        b.to(tl.int64) * stride_qb + token.to(tl.int64)[:, None] * stride_qt + q_head[:, None] * stride_qh
    )
    q = tl.load(Q + row_off + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do_ptrs = (
        DO
        + b.to(tl.int64) * stride_dob
        + token.to(tl.int64)[:, None] * stride_dot
        + q_head[:, None] * stride_doh
        + offs_dv[None, :]
    )
    do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    stat = (b.to(tl.int64) * T + token) * (HKV * group) + q_head
    lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    query_pos = token + (S - T)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    list_base = (bh.to(tl.int64) * num_tiles + tile) * union_width
    count = tl.load(tile_count + bh.to(tl.int64) * num_tiles + tile)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    for u in range(0, count):
        block = tl.load(tile_blocks + list_base + u)
        bits = tl.load(tile_masks + list_base + u)
        key_pos = block * BLOCK_N + offs_n
        key_ok = key_pos < S
        k = tl.load(
            k_base + key_pos.to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
            mask=key_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_base + key_pos.to(tl.int64)[:, None] * stride_vs + offs_dv[None, :],
            mask=key_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * scale_log2
        chosen = ((bits >> token_in_tile.to(tl.int64)) & 1) != 0
        visible = chosen[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(
        DQ + row_off + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _segment_block(seg_block, seg_start, seg_end, num_blocks, HKV, S, BLOCK_N: tl.constexpr):
    """A key-major program's segment: (batch, kv head, [start, end) of its work list, key positions of
    its block, which of them exist)."""
    seg = tl.program_id(0)
    flat_block = tl.load(seg_block + seg)
    bh = flat_block // num_blocks
    key_pos = flat_block % num_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    return bh // HKV, bh % HKV, tl.load(seg_start + seg), tl.load(seg_end + seg), key_pos, key_pos < S


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV_OUT,
    seg_block,
    seg_start,
    seg_end,
    pair_tiles,
    pair_masks,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    T,
    S,
    HKV,
    group,
    num_blocks,
    scale_log2,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    b, h, start, end, key_pos, key_ok = _segment_block(
        seg_block, seg_start, seg_end, num_blocks, HKV, S, BLOCK_N
    )
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = (
        K
        + b.to(tl.int64) * stride_kb
        + h * stride_kh
        + key_pos.to(tl.int64)[:, None] * stride_ks
        + offs_d[None, :]
    )
    v_ptrs = (
        V
        + b.to(tl.int64) * stride_vb
        + h * stride_vh
        + key_pos.to(tl.int64)[:, None] * stride_vs
        + offs_dv[None, :]
    )
    k = tl.load(k_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for pair in range(start, end):
        tile = tl.load(pair_tiles + pair)
        bits = tl.load(pair_masks + pair)
        token_in_tile, head, token, row_ok = _tile_rows(tile, group, T, TOKENS, BLOCK_M)
        q_head = h * group + head
        row_off = (
            b.to(tl.int64) * stride_qb + token.to(tl.int64)[:, None] * stride_qt + q_head[:, None] * stride_qh
        )
        q = tl.load(Q + row_off + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do_ptrs = (
            DO
            + b.to(tl.int64) * stride_dob
            + token.to(tl.int64)[:, None] * stride_dot
            + q_head[:, None] * stride_doh
            + offs_dv[None, :]
        )
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        stat = (b.to(tl.int64) * T + token) * (HKV * group) + q_head
        lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        chosen = (((bits >> token_in_tile.to(tl.int64)) & 1) != 0) & row_ok
        visible = chosen[None, :] & key_ok[:, None]  # [BLOCK_N, BLOCK_M]
        if CAUSAL:
            visible = visible & (key_pos[:, None] <= (token + (S - T))[None, :])
        s_t = tl.dot(k, tl.trans(q)) * scale_log2  # [BLOCK_N, BLOCK_M]
        p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    out_off = (b.to(tl.int64) * S + key_pos.to(tl.int64)[:, None]) * HKV + h
    tl.atomic_add(
        DK + out_off * D + offs_d[None, :],
        dk * scale,
        mask=key_ok[:, None] & (offs_d[None, :] < D),
        sem="relaxed",
    )
    tl.atomic_add(
        DV_OUT + out_off * DV + offs_dv[None, :],
        dv,
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
        sem="relaxed",
    )


def _launch_shape(
    q: torch.Tensor, v: torch.Tensor, num_kv_heads: int, block_size: int, tokens: int | None = None
) -> dict:
    """Kernel shape constants; ``tokens`` per query tile (default :func:`tokens_per_tile`)."""
    group = q.shape[2] // num_kv_heads
    tokens = tokens_per_tile(group) if tokens is None else tokens
    return dict(
        D=q.shape[-1],
        DV=v.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])),
        BLOCK_M=max(16, triton.next_power_of_2(tokens * group)),
        BLOCK_N=block_size,
        TOKENS=tokens,
    )


def sparse_attention_fwd(q, k, v, block_idx, block_size, causal, scale, tiles=None, num_warps=4):
    """Launch the forward kernel. Returns (out ``[B, T, Hq, Dv]``, lse2 ``[B, T, Hq]`` fp32, tiles).

    ``tiles``: the selection's query tiles (default: built with :func:`tokens_per_tile` tokens each)."""
    batch, seq_len_q, heads_q, _ = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    if tiles is None:
        tiles = build_query_tiles(block_idx, tokens_per_tile(heads_q // heads_kv))
    shape = _launch_shape(q, v, heads_kv, block_size, tiles.tokens_per_tile)
    num_tiles, width = tiles.blocks.shape[1], tiles.blocks.shape[2]
    out = torch.empty(batch, seq_len_q, heads_q, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, seq_len_q, heads_q, device=q.device, dtype=torch.float32)
    grid = (num_tiles, batch * heads_kv)
    _sparse_attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        tiles.blocks,
        tiles.masks,
        tiles.count,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        seq_len_q,
        seq_len_k,
        heads_kv,
        heads_q // heads_kv,
        num_tiles,
        width,
        scale * _LOG2E,
        CAUSAL=causal,
        num_warps=num_warps,
        num_stages=2,
        **shape,
    )
    return out, lse, tiles


def sparse_attention_bwd(do, q, k, v, out, lse, tiles, block_size, causal, scale):
    """Launch the dQ and dK/dV kernels. Returns (dq, dk, dv) in the input dtypes."""
    do = do.contiguous()
    delta = attention_delta(do, out)
    dk = torch.zeros(*k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(*v.shape, device=v.device, dtype=torch.float32)
    dq = query_major_bwd(do, q, k, v, lse, delta, tiles, block_size, causal, scale, dk, dv)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@triton.jit
def _attention_delta_kernel(
    DO, OUT, DELTA, num_rows, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_ROWS: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < num_rows)[:, None] & (cols < DV)[None, :]
    offs = rows[:, None] * DV + cols[None, :]
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(do * out, 1), mask=rows < num_rows)


def attention_delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rowsum(dO * O)`` per (token, q head): ``[B, T, Hq]`` fp32, the softmax backward's correction.

    One pass over the contiguous ``do`` and ``out`` (no fp32 copies of them)."""
    *lead, dim_v = out.shape
    delta = torch.empty(*lead, device=out.device, dtype=torch.float32)
    num_rows = delta.numel()
    block_rows = 32
    _attention_delta_kernel[(triton.cdiv(num_rows, block_rows),)](
        do.contiguous(),
        out.contiguous(),
        delta,
        num_rows,
        DV=dim_v,
        BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        BLOCK_ROWS=block_rows,
    )
    return delta


def query_major_bwd(
    do, q, k, v, lse, delta, tiles, block_size, causal, scale, dk_acc, dv_acc, dq=None, num_warps=4, work=None
):
    """Gradients of the attention over ``tiles``' selection: returns dq (written into ``dq`` when given,
    e.g. an fp32 buffer; else a new ``q.dtype`` tensor) and *adds* dK/dV into the fp32
    ``[B, S, Hkv, D(v)]`` buffers ``dk_acc`` / ``dv_acc``.

    ``lse`` and ``delta`` are the whole row's (log2-domain LSE, ``attention_delta``), so the selection
    may be a part of what the forward attended: each block's share of the gradient only depends on them.
    ``work``: ``tiles``' key-major dK/dV lists (``invert_tiles``), when already built.
    """
    batch, seq_len_q, heads_q, _ = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    shape = _launch_shape(q, v, heads_kv, block_size, tiles.tokens_per_tile)
    num_tiles, width = tiles.blocks.shape[1], tiles.blocks.shape[2]
    if dq is None:
        dq = torch.empty_like(q)
    common = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
    )
    _sparse_attention_bwd_dq_kernel[(num_tiles, batch * heads_kv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        tiles.blocks,
        tiles.masks,
        tiles.count,
        *common,
        seq_len_q,
        seq_len_k,
        heads_kv,
        heads_q // heads_kv,
        num_tiles,
        width,
        scale * _LOG2E,
        scale,
        CAUSAL=causal,
        num_warps=num_warps,
        num_stages=2,
        **shape,
    )
    num_blocks = -(-seq_len_k // block_size)
    if work is None:
        work = invert_tiles(tiles, num_blocks)
    if work.seg_block.numel():
        _sparse_attention_bwd_dkdv_kernel[(work.seg_block.numel(),)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk_acc,
            dv_acc,
            work.seg_block,
            work.seg_start,
            work.seg_end,
            work.tiles,
            work.masks,
            *common,
            seq_len_q,
            seq_len_k,
            heads_kv,
            heads_q // heads_kv,
            num_blocks,
            scale * _LOG2E,
            scale,
            CAUSAL=causal,
            num_warps=num_warps,
            num_stages=1,
            **shape,
        )
    return dq


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, causal, scale, num_fixed_slots=None, fixed_layout=None):
        q, k, v = (t.contiguous() for t in (q, k, v))
        routed = use_routed_forward(q.shape[1], block_idx.shape[-1], num_fixed_slots)
        if routed:
            from subquad.ops.ssa.triton_routed import sparse_attention_fwd_routed

            # The backward goes key-major too, on the forward's work lists (``ctx.plan``).
            out, lse, ctx.plan = sparse_attention_fwd_routed(
                q,
                k,
                v,
                block_idx,
                block_size,
                causal,
                scale,
                num_fixed_slots,
                keep_plan=any(ctx.needs_input_grad[:3]),
                fixed_layout=fixed_layout,
            )
            tile_tensors = ()
        else:
            out, lse, tiles = sparse_attention_fwd(q, k, v, block_idx, block_size, causal, scale)
            tile_tensors = (tiles.blocks, tiles.masks, tiles.count)
        ctx.save_for_backward(q, k, v, out, lse, block_idx, *tile_tensors)
        ctx.meta = (
            block_size,
            causal,
            scale,
            tokens_per_tile(q.shape[2] // k.shape[2]),
            num_fixed_slots if routed else None,
        )
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, block_idx, *tile_tensors = ctx.saved_tensors
        block_size, causal, scale, tokens, num_fixed_slots = ctx.meta
        if num_fixed_slots is not None:
            from subquad.ops.ssa.triton_routed import sparse_attention_bwd_routed

            dq, dk, dv = sparse_attention_bwd_routed(
                do, q, k, v, out, lse, block_idx, block_size, causal, scale, num_fixed_slots, plan=ctx.plan
            )
            ctx.plan = None  # used once (a second backward, retain_graph=True, rebuilds it)
        else:
            tiles = QueryTiles(*tile_tensors, tokens)
            dq, dk, dv = sparse_attention_bwd(do, q, k, v, out, lse, tiles, block_size, causal, scale)
        return dq, dk, dv, None, None, None, None, None, None


def use_routed_forward(seq_len_q: int, num_slots: int, num_fixed_slots: int | None) -> bool:
    """Whether the forward (and then the backward) takes the key-major routed path (``triton_routed``).

    Only when the caller says which slots are fixed (sink + local) and some are routed, and the
    sequence is long enough for query tiles' unions of routed blocks to dwarf one token's selection.
    """
    if num_fixed_slots is None or num_slots <= num_fixed_slots:
        return False
    return seq_len_q >= ROUTED_MIN_TOKENS


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    num_fixed_slots: int | None = None,
    fixed_layout: tuple | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to each token's selected key blocks (Triton).

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; block_idx: ``[B, Hkv, T, K]``
    int32 (``-1`` unused). fp16/bf16, fp32 accumulation. Differentiable in q, k, v.
    Same semantics as :func:`subquad.ops.ssa.naive.sparse_attention_naive`.
    ``num_fixed_slots``: the leading slots holding sink and local blocks (``select_blocks`` layout);
    when given, long sequences run the routed slots key-major (``triton_routed``), same result.
    ``fixed_layout`` (``SSASelection.fixed_layout``): the fixed slots are ``select_blocks``' for this
    layout, so their work lists may be reused from an earlier call.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return SparseAttentionFunction.apply(
        q, k, v, block_idx, block_size, causal, scale, num_fixed_slots, fixed_layout
    )
