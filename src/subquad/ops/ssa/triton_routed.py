"""Sparse attention with the routed blocks processed key-major (Triton): forward and backward.

Same result as ``triton_attention.sparse_attention_fwd`` (output and log2-domain LSE ``[B, T, Hq]``),
computed in three steps:

A. **Fixed part** (sink + local slots, ``block_idx[..., :num_fixed_slots]``): the query-major kernel of
   ``triton_attention``. Neighbouring tokens share these blocks, so a query tile's union is about
   ``sink + local + 1`` blocks and the K/V of a tile is read once for all its rows.
B. **Routed part, key-major**: on random picks neighbouring tokens route to different blocks, and a
   query tile's union grows to ~``tokens_per_tile * top_k`` blocks (``tiles.tile_overhead`` ~13 at 1M
   tokens), each loaded for the whole tile. Here the ``(token, slot)`` pairs are grouped by the
   ``(batch * kv head, block)`` they picked (a stable sort of int32 keys: token order within a block)
   and cut into segments of at most ``segment_tokens`` tokens. One program per segment loads the
   block's K and V once and walks the segment ``TOKENS`` tokens at a time (rows = token x the
   ``Hq // Hkv`` query heads of the KV head, as in ``triton_attention``), gathering their q rows. It
   writes, per (token, q head, slot), the softmax over that block alone: the normalised partial
   output (``q.dtype``) and its log2-domain LSE (fp32) into ``[B, Tc, Hq, top_k, Dv]`` and
   ``[B, Tc, Hq, top_k]`` buffers (LSE ``-inf`` = slot unused).
C. **Merge** (a small Triton kernel): per (token, q head) the fixed part and the ``top_k`` partials
   combine as ``out = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m)``,
   ``lse = m + log2(sum_i 2^(lse_i - m))``, written in place over the fixed part. Empty parts (LSE
   ``-inf``; the fixed kernel's empty rows carry ``+inf``) get weight 0 and are never read.

Queries go through B and C in chunks of ``Tc`` tokens so the partial buffers stay bounded
(``_PARTIAL_BYTES``); memory is linear in the sequence length.

Bytes per routed (token, kv head, slot) pair, G = Hq // Hkv, e = 2 bytes (bf16): q gather
``G * D * e``, partial write ``G * Dv * e`` and read back in the merge ``G * Dv * e``, LSE ``3 * G * 4``
(fill, write, read); plus K/V ``block_size * (D + Dv) * e`` once per segment (about once per touched
block per chunk). At B=1, T=S=1M, Hq=32, Hkv=8, D=Dv=128, block 64, top_k 16: 134M pairs x 3 KB
= 412 GB, LSE 6 GB, K/V ~40 GB (~1.2M segments over 16 chunks of 64K tokens), fixed part ~22 GB
(q, out, K/V once; its tile unions hit L2) and the merge's fixed read + final write 17 GB: ~0.5 TB,
against ~4 TB of K/V for the query-major walk of the routed union. FLOPs: ~21 TFLOP routed (134M
pairs x 4 rows x 64 keys x 128 x 4, plus ~20% partly-filled steps) and ~4 TFLOP fixed.

**Backward** (:func:`sparse_attention_bwd_routed`), same split. Given the forward's merged LSE and
``delta = rowsum(dO * O)``, each selected block's share of the gradient is independent of the others
(``dS = P * (dP - delta)`` with ``P`` from the whole row's LSE), so the fixed slots run the query-major
dQ and dK/dV kernels of ``triton_attention`` restricted to them, and the routed pairs run key-major: one
program per segment of a block's pairs loads K/V once, gathers the segment's q and dO rows, keeps the
block's dK/dV in registers (one fp32 atomic add per segment) and stores each token's dQ share as a
partial row (``q.dtype``, ``[B, Tc, Hq, top_k, D]``, chunked like the forward's partials); a second
small kernel sums a token's partials and the fixed part's fp32 dQ into the final dq. Per routed pair:
q and dO gathers ``2 * G * D * e``, the dQ partial written and read ``2 * G * D * e``; at 128K
(layer-8b shape, 16.8M pairs) ~69 GB and ~5.5 TFLOP (five matmuls) against the query-major
walk's ~11x tile overhead on random picks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from subquad.ops import fused
from subquad.ops.ssa.tiles import (
    KeyBlockWork,
    QueryTiles,
    build_query_tiles,
    invert_tiles,
    max_segments_for,
    segment_owners,
)
from subquad.ops.ssa.triton_attention import (
    _LOG2E,
    _exp2,
    _launch_shape,
    _log2,
    _segment_block,
    attention_delta,
    query_major_bwd,
    sparse_attention_fwd,
    tokens_per_tile,
)

# Partial-output buffer per chunk of queries (bytes); 8 GiB = 64K tokens at Hq=32, top_k=16, Dv=128.
_PARTIAL_BYTES = 8 << 30
# Tokens per routed program: K/V of a block is loaded once per segment.
_SEGMENT_TOKENS = 256
# Matrix rows (token x q head) per step of a routed program, and its launch knobs (tuning only).
_ROUTED_ROWS = 64
_ROUTED_NUM_WARPS = 4
_ROUTED_NUM_STAGES = 1
# Register cap a thread (0: the compiler's choice, ~208): 168 lets three programs share an SM without
# spills (scripts/kernel_resources.py); the step is latency-bound, so more programs hide more of it.
_ROUTED_MAX_REGISTERS = 168
# (token, q head) rows per merge program.
_MERGE_ROWS = 16
# Fixed slots (sink + local, query-major): matrix rows per query tile and warps (tuning only).
_FIXED_ROWS = 64
_FIXED_NUM_WARPS = 4
# Backward (tuning only): pairs per segment (dK/dV of a block summed in registers over a segment, one
# atomic add per segment), matrix rows per step, warps and pipeline stages.
_BWD_SEGMENT_TOKENS = 256
_BWD_ROUTED_ROWS = 128
_BWD_NUM_WARPS = 8
_BWD_NUM_STAGES = 1


@triton.jit
def _segment_needs_mask(
    pair_entry, start, key_pos, chunk_start, T, S, NUM_SLOTS: tl.constexpr, CAUSAL: tl.constexpr
):
    """Whether any score of a routed segment must be masked: its block runs past the last key, or (causal)
    ends after its first token's position. ``select_blocks`` routes only blocks before a token's local
    window, and a segment's tokens ascend, so its scores need no mask; hand-made selections may."""
    last_key = tl.max(key_pos, 0)
    masked = last_key >= S
    if CAUSAL:
        first_token = chunk_start + tl.load(pair_entry + start) // NUM_SLOTS
        masked = masked | (last_key > first_token + (S - T))
    return masked


@triton.jit
def _routed_partial_kernel(
    Q,
    K,
    V,
    O_PART,
    LSE_PART,
    seg_block,
    seg_start,
    seg_end,
    pair_entry,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    T,
    S,
    HKV,
    group,
    num_blocks,
    chunk_start,
    chunk_len,
    scale_log2,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    CAUSAL: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    """One segment of a key block's routed pairs (module docstring, step B). Q is contiguous
    ``[B, T, Hq, D]`` with fewer than 2**31 rows (``sparse_attention_fwd_routed``), so a q row's index
    is int32 and its offset one multiply by the constant D: each row's address took ~9 instructions
    with 64-bit strides, 8 rows a thread a step."""
    b, h, start, end, key_pos, key_ok = _segment_block(
        seg_block, seg_start, seg_end, num_blocks, HKV, S, BLOCK_N
    )
    if start >= end:  # a spare segment of a list sized without a host sync (routed_work)
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = (
        K
        + b.to(tl.int64) * stride_kb
        + h * stride_kh
        + key_pos.to(tl.int64)[None, :] * stride_ks
        + offs_d[:, None]
    )
    v_ptrs = (
        V
        + b.to(tl.int64) * stride_vb
        + h * stride_vh
        + key_pos.to(tl.int64)[:, None] * stride_vs
        + offs_dv[None, :]
    )
    k = tl.load(k_ptrs, mask=key_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
    rows = tl.arange(0, BLOCK_M)
    token_in_tile = rows // group
    head = rows % group
    q_head = h * group + head
    heads_q = HKV * group
    in_tile = token_in_tile < TOKENS
    # entry = token within the chunk * NUM_SLOTS + routed slot, loaded a step ahead (the q gather
    # waits on it: ~8% of this kernel at 128K). NUM_SLOTS is a constant so that // and % compile to
    # shifts: as a runtime value they were integer divisions, repeated in each layout the rows take
    # (7% of this kernel at 1M).
    entry_next = tl.load(
        pair_entry + start + token_in_tile, mask=in_tile & (start + token_in_tile < end), other=0
    )
    masked = _segment_needs_mask(pair_entry, start, key_pos, chunk_start, T, S, NUM_SLOTS, CAUSAL)
    for first in range(start, end, TOKENS):
        pair = first + token_in_tile
        row_ok = in_tile & (pair < end)
        entry = entry_next
        entry_next = tl.load(pair_entry + pair + TOKENS, mask=in_tile & (pair + TOKENS < end), other=0)
        # Entries are >= 0: unsigned, // is a shift without a sign fix-up.
        token = chunk_start + entry.to(tl.uint32) // NUM_SLOTS
        q_row = (b * T + token) * heads_q + q_head
        # Rows past the segment's end read the row of entry 0 (their entries' default): scores of their
        # own, never stored, so their loads need no mask.
        q = tl.load(
            Q + q_row.to(tl.int64)[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0
        )
        s = tl.dot(q, k)  # [BLOCK_M, BLOCK_N], unscaled: the scale goes into the exponent's FMA
        if masked:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= (token + (S - T))[:, None])
            s = tl.where(visible, s, float("-inf"))
        m = tl.max(s, 1) * scale_log2  # scale > 0 (checked by the interface)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = _exp2(s * scale_log2 - m_safe[:, None], FAST_EXP2)
        l_sum = tl.sum(p, 1)
        l_safe = tl.where(l_sum == 0.0, 1.0, l_sum)
        # The block is the row's whole softmax here: p is normalised before the product ([BLOCK_M,
        # BLOCK_N] multiplies, half of [BLOCK_M, BLOCK_DV]). One reciprocal a row: `/` is div.full.f32,
        # with a range test and rescale on every element.
        p = p * (1.0 / l_safe)[:, None]
        out = tl.dot(p.to(v.dtype), v)  # [BLOCK_M, BLOCK_DV]
        lse = tl.where(l_sum == 0.0, float("-inf"), m_safe + _log2(l_safe, FAST_EXP2))
        # Partial buffers: [B, Tc, Hq, NUM_SLOTS] (+ [Dv]). The row index fits int32 (a chunk's buffer
        # holds at most _PARTIAL_BYTES / 32 rows); only the element offset needs 64 bits. token_c is
        # recomputed here, not kept from the top of the step: held across it, the loop took 643 instead of
        # 638 instructions and 168 registers instead of 166 (offline sm_90, scripts/kernel_resources.py).
        token_c, slot = entry.to(tl.uint32) // NUM_SLOTS, entry.to(tl.uint32) % NUM_SLOTS
        part = ((b * chunk_len + token_c) * heads_q + q_head) * NUM_SLOTS + slot
        tl.store(
            O_PART + part.to(tl.int64)[:, None] * DV + offs_dv[None, :],
            out.to(O_PART.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        )
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _merge_partials_kernel(
    OUT,
    LSE,
    O_PART,
    LSE_PART,
    T,
    chunk_start,
    chunk_len,
    heads_q,
    num_rows,
    NUM_SLOTS: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    # A row is one (batch, token of the chunk, q head); OUT / LSE are the contiguous [B, T, Hq(, Dv)].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    per_batch = chunk_len * heads_q
    full_row = (rows // per_batch * T + chunk_start) * heads_q + rows % per_batch
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv[None, :] < DV
    slots = tl.arange(0, BLOCK_SLOTS)
    lse_fixed = tl.load(LSE + full_row, mask=row_ok, other=float("inf"))
    # The query-major kernel marks an empty row with +inf (so its backward gives p = 0): weight 0 here.
    lse_fixed = tl.where(lse_fixed == float("inf"), float("-inf"), lse_fixed)
    lse_parts = tl.load(
        LSE_PART + rows[:, None] * NUM_SLOTS + slots[None, :],
        mask=row_ok[:, None] & (slots[None, :] < NUM_SLOTS),
        other=float("-inf"),
    )
    m = tl.maximum(lse_fixed, tl.max(lse_parts, 1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.math.exp2(lse_fixed - m_safe)
    total = weight
    o_fixed = tl.load(
        OUT + full_row[:, None] * DV + offs_dv[None, :],
        mask=(row_ok & (lse_fixed > float("-inf")))[:, None] & dv_ok,
        other=0.0,
    )
    acc = weight[:, None] * o_fixed.to(tl.float32)
    for slot in range(NUM_SLOTS):
        lse_slot = tl.load(LSE_PART + rows * NUM_SLOTS + slot, mask=row_ok, other=float("-inf"))
        weight = tl.math.exp2(lse_slot - m_safe)
        # Unused slots are never written: mask their loads rather than multiply garbage by 0.
        o_slot = tl.load(
            O_PART + (rows * NUM_SLOTS + slot)[:, None] * DV + offs_dv[None, :],
            mask=(row_ok & (lse_slot > float("-inf")))[:, None] & dv_ok,
            other=0.0,
        )
        acc += weight[:, None] * o_slot.to(tl.float32)
        total += weight
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = acc / total_safe[:, None]
    lse = tl.where(total == 0.0, float("inf"), m_safe + tl.math.log2(total_safe))
    tl.store(
        OUT + full_row[:, None] * DV + offs_dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok,
    )
    tl.store(LSE + full_row, lse, mask=row_ok)


@triton.jit
def _routed_bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ_PART,
    DK_ACC,
    DV_ACC,
    seg_block,
    seg_start,
    seg_end,
    pair_entry,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    T,
    S,
    HKV,
    group,
    num_blocks,
    chunk_start,
    chunk_len,
    scale_log2,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    CAUSAL: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    """One segment of a key block's routed pairs: K/V loaded once, dK/dV summed over the segment in
    registers (one fp32 atomic add per segment), each token's dQ share stored to its (token, q head,
    slot) row of ``DQ_PART`` (``[B, Tc, Hq, NUM_SLOTS, D]`` in q's dtype, summed per token by
    ``_sum_dq_partials_kernel``)."""
    b, h, start, end, key_pos, key_ok = _segment_block(
        seg_block, seg_start, seg_end, num_blocks, HKV, S, BLOCK_N
    )
    if start >= end:  # a spare segment of a list sized without a host sync (routed_work)
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # [BLOCK_N, BLOCK_D] and [BLOCK_N, BLOCK_DV]
    k = tl.load(
        K
        + b.to(tl.int64) * stride_kb
        + h * stride_kh
        + key_pos.to(tl.int64)[:, None] * stride_ks
        + offs_d[None, :],
        mask=key_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        V
        + b.to(tl.int64) * stride_vb
        + h * stride_vh
        + key_pos.to(tl.int64)[:, None] * stride_vs
        + offs_dv[None, :],
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    rows = tl.arange(0, BLOCK_M)
    token_in_tile = rows // group
    q_head = h * group + rows % group
    heads_q = HKV * group
    in_tile = token_in_tile < TOKENS
    # Pair entries a step ahead, as in the forward.
    entry_next = tl.load(
        pair_entry + start + token_in_tile, mask=in_tile & (start + token_in_tile < end), other=0
    )
    masked = _segment_needs_mask(pair_entry, start, key_pos, chunk_start, T, S, NUM_SLOTS, CAUSAL)
    for first in range(start, end, TOKENS):
        pair = first + token_in_tile
        row_ok = in_tile & (pair < end)
        entry = entry_next
        entry_next = tl.load(pair_entry + pair + TOKENS, mask=in_tile & (pair + TOKENS < end), other=0)
        token_c, slot = entry.to(tl.uint32) // NUM_SLOTS, entry.to(tl.uint32) % NUM_SLOTS
        # Q, DO, LSE and DELTA are contiguous [B, T, Hq(, D)]: one int32 row index, as in the forward.
        stat = (b * T + chunk_start + token_c) * heads_q + q_head
        q = tl.load(
            Q + stat.to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        do = tl.load(
            DO + stat.to(tl.int64)[:, None] * DV + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        # Rows past the segment's end have LSE +inf: p = 0.
        p = _exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None], FAST_EXP2)  # [BLOCK_M, BLOCK_N]
        if masked:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= (chunk_start + token_c + (S - T))[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k) * scale  # [BLOCK_M, BLOCK_D]
        # The row index in int32, as in the forward.
        part = ((b * chunk_len + token_c) * heads_q + q_head) * NUM_SLOTS + slot
        tl.store(
            DQ_PART + part.to(tl.int64)[:, None] * D + offs_d[None, :],
            dq.to(DQ_PART.dtype.element_ty),
            mask=row_ok[:, None] & (offs_d[None, :] < D),
        )
    out_off = (b.to(tl.int64) * S + key_pos.to(tl.int64)[:, None]) * HKV + h
    tl.atomic_add(
        DK_ACC + out_off * D + offs_d[None, :],
        dk * scale,
        mask=key_ok[:, None] & (offs_d[None, :] < D),
        sem="relaxed",
    )
    tl.atomic_add(
        DV_ACC + out_off * DV + offs_dv[None, :],
        dv,
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
        sem="relaxed",
    )


@triton.jit
def _sum_dq_partials_kernel(
    DQ,
    DQ_FIXED,
    DQ_PART,
    ROUTED,
    stride_rb,
    stride_rh,
    stride_rt,
    stride_rs,
    T,
    chunk_start,
    chunk_len,
    heads_q,
    group,
    num_rows,
    NUM_SLOTS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    # A row is one (batch, token of the chunk, q head): DQ = DQ_FIXED (fp32, the fixed slots' share) +
    # the row's routed partials, in DQ's dtype; all three laid out [B, T, Hq, D]. Slots the token left
    # unused (ROUTED < 0) were never written, so their partials are not read.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    per_batch = chunk_len * heads_q
    b = rows // per_batch
    token = chunk_start + rows % per_batch // heads_q
    kv_head = rows % heads_q // group
    full_row = (b * T + token) * heads_q + rows % heads_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    routed = ROUTED + b * stride_rb + kv_head * stride_rh + token * stride_rt
    acc = tl.load(DQ_FIXED + full_row[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    for slot in range(NUM_SLOTS):
        used = row_ok & (tl.load(routed + slot * stride_rs, mask=row_ok, other=-1) >= 0)
        acc += tl.load(
            DQ_PART + (rows * NUM_SLOTS + slot)[:, None] * D + offs_d[None, :],
            mask=used[:, None] & d_ok,
            other=0.0,
        ).to(tl.float32)
    tl.store(
        DQ + full_row[:, None] * D + offs_d[None, :], acc.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok
    )


def routed_work(routed_idx: torch.Tensor, num_blocks: int, segment_tokens: int):
    """Group a chunk's routed ``(token, slot)`` pairs by the key block they picked.

    routed_idx: ``[B, Hkv, Tc, R]`` int32 (``-1`` unused). Returns ``(seg_block, seg_start, seg_end,
    pair_entry)``: per segment the flat block ``bh * NB + block`` and a ``[start, end)`` range of at
    most ``segment_tokens`` pairs into ``pair_entry`` (int32 ``token * R + slot``), tokens ascending
    within a block (the kernels' mask test reads only a segment's first token). Sized by a bound, not
    counted (no host sync): the segments past the needed ones are empty, and the kernels skip them.
    """
    batch, heads, chunk_len, slots = routed_idx.shape
    bh_count = batch * heads
    owners = bh_count * num_blocks
    if owners >= 2**31 or chunk_len * slots >= 2**31:
        raise ValueError(f"routed work list too large for int32 keys: {bh_count} x {num_blocks} blocks")
    device = routed_idx.device
    bh = torch.arange(bh_count, device=device, dtype=torch.int32).view(batch, heads, 1, 1)
    # Unused slots sort after every block (key ``owners``) and fall outside every block's range.
    key = torch.where(routed_idx >= 0, bh * num_blocks + routed_idx, owners).flatten()
    # Stable: a block's pairs keep their (token, slot) order.
    sorted_key, order = torch.sort(key, stable=True)
    pair_entry = (order % (chunk_len * slots)).to(torch.int32)
    bound = max_segments_for(key.numel(), owners, segment_tokens)
    return (*segment_owners(sorted_key, owners, segment_tokens, bound), pair_entry)


@dataclass
class FixedPart:
    """The fixed slots' work lists: query tiles for the forward and dQ, and the key-major dK/dV
    segments (built by the first backward that needs them)."""

    tiles: QueryTiles
    work: KeyBlockWork | None = None

    def key_major(self, num_blocks: int) -> KeyBlockWork:
        if self.work is None:
            self.work = invert_tiles(self.tiles, num_blocks)
        return self.work


@dataclass
class RoutedPlan:
    """The forward's work lists, reused by the backward: the fixed slots' and, per chunk of
    ``chunk_tokens`` queries, :func:`routed_work`'s grouping of the routed pairs (``chunks`` is empty
    unless the forward was asked to keep it)."""

    fixed: FixedPart | None
    chunk_tokens: int
    chunks: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


# The fixed parts of the last few ``select_blocks`` layouts. Every layer of a model, and every step at
# one length, routes the same sink and local blocks (the way FlexAttention reuses one block mask), so
# their tiles and dK/dV lists (two sorts, ~40 small ops, host syncs for the dK/dV lists) are built once,
# not per call. Four: the ``local_rope`` layers hold two per chunk (local and sink slots, kept apart).
_FIXED_CACHE: OrderedDict = OrderedDict()
_FIXED_CACHE_SIZE = 4


def fixed_part(
    block_idx: torch.Tensor,
    num_fixed_slots: int,
    group: int,
    seq_len_k: int,
    block_size: int,
    layout: tuple | None = None,
) -> FixedPart:
    """The fixed slots' :class:`FixedPart`. ``layout``: what determines their content besides the shapes
    (``SSASelection.fixed_layout``: ``select_blocks`` built them); with it the result is cached."""
    key = None
    if layout is not None:
        key = (block_idx.device, *block_idx.shape[:3], num_fixed_slots, group, seq_len_k, block_size, layout)
        if key in _FIXED_CACHE:
            _FIXED_CACHE.move_to_end(key)
            return _FIXED_CACHE[key]
    fixed_idx = block_idx[..., :num_fixed_slots].contiguous()
    part = FixedPart(build_query_tiles(fixed_idx, tokens_per_tile(group, _FIXED_ROWS)))
    if key is not None:
        _FIXED_CACHE[key] = part
        while len(_FIXED_CACHE) > _FIXED_CACHE_SIZE:
            _FIXED_CACHE.popitem(last=False)
    return part


def _check_query_rows(q: torch.Tensor) -> None:
    """The routed kernels index q's rows ``(batch, token, q head)`` in int32."""
    batch, seq_len_q, heads_q = q.shape[:3]
    if batch * seq_len_q * heads_q >= 2**31:
        raise ValueError(f"q: {batch} x {seq_len_q} x {heads_q} rows [B, T, Hq], expected fewer than 2**31")


def _check_partial_rows(chunk_tokens: int, rows_per_token: int) -> None:
    """The kernels index a chunk's partial rows in int32 (the default chunks hold at most 2**28)."""
    if chunk_tokens * rows_per_token >= 2**31:
        raise ValueError(
            f"chunk_tokens={chunk_tokens}: {chunk_tokens} x {rows_per_token} partial rows a chunk, "
            "expected fewer than 2**31 (a smaller chunk_tokens, or None for the default)"
        )


def sparse_attention_fwd_routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
    num_fixed_slots: int,
    chunk_tokens: int | None = None,
    segment_tokens: int = _SEGMENT_TOKENS,
    keep_plan: bool = False,
    fixed_layout: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RoutedPlan]:
    """Forward with fixed slots query-major and routed slots key-major.

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (fp16/bf16, contiguous);
    block_idx: ``[B, Hkv, T, K]`` int32, ``-1`` unused; slots ``[:num_fixed_slots]`` are the sink and
    local blocks, the rest routed. Returns (out ``[B, T, Hq, Dv]`` in ``q.dtype``, lse ``[B, T, Hq]``
    fp32 in log2 units, ``+inf`` for a row that sees no key), as ``sparse_attention_fwd``, and the
    :class:`RoutedPlan` for the backward (with the routed work lists if ``keep_plan``: 4 bytes per
    routed pair). ``chunk_tokens`` (default: partial buffers of ``_PARTIAL_BYTES``) and
    ``segment_tokens`` only change the schedule, never the result. ``fixed_layout``
    (``SSASelection.fixed_layout``) lets the fixed slots' work lists come from a cache (:func:`fixed_part`).
    """
    batch, seq_len_q, heads_q, _ = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    dim_v = v.shape[-1]
    num_slots = block_idx.shape[-1]
    if not 0 <= num_fixed_slots <= num_slots:
        raise ValueError(f"num_fixed_slots={num_fixed_slots}: expected 0..{num_slots} (slots in block_idx)")
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens={segment_tokens}: expected >= 1")
    _check_query_rows(q)
    num_routed = num_slots - num_fixed_slots
    per_token = batch * heads_q * max(1, num_routed) * dim_v * q.element_size()
    if chunk_tokens is None:
        chunk_tokens = max(1, _PARTIAL_BYTES // per_token)
    chunk_tokens = min(chunk_tokens, seq_len_q)
    _check_partial_rows(chunk_tokens, batch * heads_q * num_routed)
    plan = RoutedPlan(None, chunk_tokens)
    if num_fixed_slots:
        plan.fixed = fixed_part(
            block_idx, num_fixed_slots, heads_q // heads_kv, seq_len_k, block_size, fixed_layout
        )
        out, lse, _ = sparse_attention_fwd(
            q, k, v, None, block_size, causal, scale, plan.fixed.tiles, num_warps=_FIXED_NUM_WARPS
        )
    else:
        out = torch.empty(batch, seq_len_q, heads_q, dim_v, device=q.device, dtype=q.dtype)
        lse = torch.full((batch, seq_len_q, heads_q), float("inf"), device=q.device, dtype=torch.float32)
    if num_routed == 0:
        return out, lse, plan

    shape = _launch_shape(q, v, heads_kv, block_size, tokens_per_tile(heads_q // heads_kv, _ROUTED_ROWS))
    num_blocks = -(-seq_len_k // block_size)
    o_part = torch.empty(batch * chunk_tokens * heads_q * num_routed * dim_v, device=q.device, dtype=q.dtype)
    lse_part = torch.empty(batch * chunk_tokens * heads_q * num_routed, device=q.device, dtype=torch.float32)
    routed_idx = block_idx[..., num_fixed_slots:]
    for chunk_start in range(0, seq_len_q, chunk_tokens):
        chunk_len = min(chunk_tokens, seq_len_q - chunk_start)
        num_rows = batch * chunk_len * heads_q
        chunk_lse = lse_part[: num_rows * num_routed]
        chunk_lse.fill_(float("-inf"))
        chunk_idx = routed_idx[:, :, chunk_start : chunk_start + chunk_len]
        work = routed_work(chunk_idx, num_blocks, segment_tokens)
        if keep_plan:
            plan.chunks.append(work)
        seg_block, seg_start, seg_end, pair_entry = work
        if seg_block.numel():
            _routed_partial_kernel[(seg_block.numel(),)](
                q,
                k,
                v,
                o_part,
                chunk_lse,
                seg_block,
                seg_start,
                seg_end,
                pair_entry,
                k.stride(0),
                k.stride(1),
                k.stride(2),
                v.stride(0),
                v.stride(1),
                v.stride(2),
                seq_len_q,
                seq_len_k,
                heads_kv,
                heads_q // heads_kv,
                num_blocks,
                chunk_start,
                chunk_len,
                scale * _LOG2E,
                NUM_SLOTS=num_routed,
                CAUSAL=causal,
                FAST_EXP2=fused.inline_ptx(q.device),
                num_warps=_ROUTED_NUM_WARPS,
                num_stages=_ROUTED_NUM_STAGES,
                maxnreg=_ROUTED_MAX_REGISTERS or None,
                **shape,
            )
        _merge_partials_kernel[(triton.cdiv(num_rows, _MERGE_ROWS),)](
            out,
            lse,
            o_part,
            chunk_lse,
            seq_len_q,
            chunk_start,
            chunk_len,
            heads_q,
            num_rows,
            NUM_SLOTS=num_routed,
            BLOCK_SLOTS=max(2, triton.next_power_of_2(num_routed)),
            DV=dim_v,
            BLOCK_DV=shape["BLOCK_DV"],
            BLOCK_ROWS=_MERGE_ROWS,
            num_warps=4,
        )
    return out, lse, plan


def sparse_attention_bwd_routed(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
    num_fixed_slots: int,
    chunk_tokens: int | None = None,
    segment_tokens: int = _BWD_SEGMENT_TOKENS,
    plan: RoutedPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_attention_fwd_routed`: fixed slots query-major, routed slots key-major.

    Same arguments as the forward plus ``do`` (``[B, T, Hq, Dv]``) and the forward's ``out`` and
    ``lse``. Returns (dq, dk, dv) in the input dtypes, equal to ``triton_attention.sparse_attention_bwd``
    up to fp32 summation order. ``chunk_tokens`` (default: dQ partial buffers of ``_PARTIAL_BYTES``)
    and ``segment_tokens`` only change the schedule, never the result; a ``plan`` from the forward on
    the same ``block_idx`` saves rebuilding its work lists (its chunks and segments are used then).
    """
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    num_slots = block_idx.shape[-1]
    if not 0 <= num_fixed_slots <= num_slots:
        raise ValueError(f"num_fixed_slots={num_fixed_slots}: expected 0..{num_slots} (slots in block_idx)")
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens={segment_tokens}: expected >= 1")
    _check_query_rows(q)
    q, do = q.contiguous(), do.contiguous()
    delta = attention_delta(do, out)
    dk = torch.zeros(*k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(*v.shape, device=v.device, dtype=torch.float32)
    num_routed = num_slots - num_fixed_slots
    num_blocks = -(-seq_len_k // block_size)
    # The fixed slots' dQ in fp32; the routed partials are added to it in the final write of dq.
    if num_fixed_slots:
        dq_fixed = torch.empty(batch, seq_len_q, heads_q, dim, device=q.device, dtype=torch.float32)
        fixed = plan.fixed if plan is not None else None
        if fixed is None:
            fixed = fixed_part(block_idx, num_fixed_slots, heads_q // heads_kv, seq_len_k, block_size)
        query_major_bwd(
            do,
            q,
            k,
            v,
            lse,
            delta,
            fixed.tiles,
            block_size,
            causal,
            scale,
            dk,
            dv,
            dq=dq_fixed,
            num_warps=_FIXED_NUM_WARPS,
            work=fixed.key_major(num_blocks),
        )
    else:
        dq_fixed = torch.zeros(batch, seq_len_q, heads_q, dim, device=q.device, dtype=torch.float32)
    if num_routed == 0:
        return dq_fixed.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    shape = _launch_shape(q, v, heads_kv, block_size, tokens_per_tile(heads_q // heads_kv, _BWD_ROUTED_ROWS))
    per_token = batch * heads_q * num_routed * dim * q.element_size()
    chunks = plan.chunks if plan is not None else []
    if chunks:
        chunk_tokens = plan.chunk_tokens
    elif chunk_tokens is None:
        chunk_tokens = max(1, _PARTIAL_BYTES // per_token)
    chunk_tokens = min(chunk_tokens, seq_len_q)
    _check_partial_rows(chunk_tokens, batch * heads_q * num_routed)
    dq_part = torch.empty(chunk_tokens * per_token // q.element_size(), device=q.device, dtype=q.dtype)
    dq = torch.empty_like(q)
    routed_idx = block_idx[..., num_fixed_slots:]
    for chunk, chunk_start in enumerate(range(0, seq_len_q, chunk_tokens)):
        chunk_len = min(chunk_tokens, seq_len_q - chunk_start)
        if chunks:
            seg_block, seg_start, seg_end, pair_entry = chunks[chunk]
        else:
            seg_block, seg_start, seg_end, pair_entry = routed_work(
                routed_idx[:, :, chunk_start : chunk_start + chunk_len], num_blocks, segment_tokens
            )
        if seg_block.numel():
            _routed_bwd_kernel[(seg_block.numel(),)](
                q,
                k,
                v,
                do,
                lse,
                delta,
                dq_part,
                dk,
                dv,
                seg_block,
                seg_start,
                seg_end,
                pair_entry,
                k.stride(0),
                k.stride(1),
                k.stride(2),
                v.stride(0),
                v.stride(1),
                v.stride(2),
                seq_len_q,
                seq_len_k,
                heads_kv,
                heads_q // heads_kv,
                num_blocks,
                chunk_start,
                chunk_len,
                scale * _LOG2E,
                scale,
                NUM_SLOTS=num_routed,
                CAUSAL=causal,
                FAST_EXP2=fused.inline_ptx(q.device),
                num_warps=_BWD_NUM_WARPS,
                num_stages=_BWD_NUM_STAGES,
                **shape,
            )
        num_rows = batch * chunk_len * heads_q
        _sum_dq_partials_kernel[(triton.cdiv(num_rows, _MERGE_ROWS),)](
            dq,
            dq_fixed,
            dq_part,
            routed_idx,
            *routed_idx.stride(),
            seq_len_q,
            chunk_start,
            chunk_len,
            heads_q,
            heads_q // heads_kv,
            num_rows,
            NUM_SLOTS=num_routed,
            D=dim,
            BLOCK_D=shape["BLOCK_D"],
            BLOCK_ROWS=_MERGE_ROWS,
            num_warps=4,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
