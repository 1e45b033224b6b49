"""Triton routing: exact top-k blocks per query token without materialising the score matrix.

Both routers run in the same three steps (``select.py`` holds the plain-PyTorch references):

1. **Group scores** ``[B, Hkv, T, NG]``: blocks are grouped ``G`` at a time.
   ``flat``: the exact maximum of the token's scores over the candidate blocks of each group, computed
   on the tensor cores a tile of tokens at a time (:func:`group_max_scores`); only ``1/G`` of the
   score matrix is written. ``tree``: an upper bound per complete group (``select._route_tree``).
2. **Probe** the ``P`` best groups per token (``torch.topk`` over ``NG``).
   For ``flat`` with ``P = top_k`` this is exact: a block in the top-k has a score at least the k-th
   largest, and at most k groups hold such a block, so all of them are among the k best group maxima.
3. **Rescore** the blocks of the probed groups (plus, for ``tree``, the token's own partial group)
   and keep the top-k (:func:`rescore_topk`): for budgets up to 16, a running top-k merged with
   ``tl.topk`` on packed (score, block) keys; above, the scores are written and ``torch.topk`` takes
   them (the merge's sorting network compiles for minutes at larger widths).

With ``summary="max"`` a block's score is the best of its sub-blocks' (``select.block_scores``): every
kernel below takes it as the block's one score, computed from its ``SUBS`` summaries where it is needed.

``flat`` with a small budget takes a faster exact route instead (:func:`threshold_topk`): two passes
over the scores, the first for a per-token threshold that the k-th best block must reach, the second
collecting the few blocks that reach it; no per-chunk merges and no gathered rescore.

``beam`` (:func:`route_beam_triton`) runs on these kernels: its level-2 nodes through the flat router,
its level-1 nodes and blocks through :func:`rescore_topk`.

A few tokens against a long context (a decode step) take :func:`split_topk`: there the programs split
the blocks rather than the tokens, write every score, and ``torch.topk`` takes the top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subquad.ops import fused, pdl
from subquad.ops.ssa import triton_attention  # noqa: F401  (interpreter fix for CPU checks)


@triton.jit
def _is_candidate(
    block, query_block, SINK: tl.constexpr, LOCAL: tl.constexpr, num_blocks, CAUSAL: tl.constexpr
):
    """Routed candidates: after the sinks, outside (causal: before) the token's local window."""
    ok = (block >= SINK) & (block < num_blocks)
    if CAUSAL:
        ok = ok & (block <= query_block - LOCAL)
    else:
        ok = ok & ((block > query_block) | (block <= query_block - LOCAL))
    return ok


@triton.jit
def _pack_keys(score, ids, valid):
    """Top-k keys as int64: (order-preserving score bits >> 1) << 32 | id; -1 where not ``valid``.

    Flipping negative floats makes integer order float order; dropping the lowest bit keeps the key
    non-negative in 63 bits, so -1 sorts below every real key.
    """
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, ~bits, bits | (-2147483648)).to(tl.uint32)
    key = ((ordered >> 1).to(tl.int64) << 32) | ids.to(tl.int64)
    return tl.where(valid, key, -1)


@triton.jit
def _merge_top(best, key, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr):
    """Top ``K_PAD`` of a running top-k and ``K_PAD`` new keys per row."""
    return tl.topk(tl.reshape(tl.join(best, key), [BLOCK_M, 2 * K_PAD]), K_PAD)


@triton.jit
def _routing_rows(
    RQ,
    stride_rb,
    stride_rt,
    stride_rh,
    b,
    h,
    tile,
    T,
    pos_offset,
    num_blocks,
    block_size,
    offs_d,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """A tile's token rows, their key blocks, routing queries ``[BLOCK_M, BLOCK_D]`` and the first
    block no row of the tile may route to (causal: the start of the last row's local window)."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    query_block = (rows + pos_offset) // block_size
    rq = tl.load(
        RQ
        + b.to(tl.int64) * stride_rb
        + rows.to(tl.int64)[:, None] * stride_rt
        + h * stride_rh
        + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    if CAUSAL:
        last_row = tl.minimum(tile * BLOCK_M + BLOCK_M - 1, T - 1)
        stop = (last_row + pos_offset) // block_size - LOCAL + 1
    else:
        stop = num_blocks
    return rows, row_ok, query_block, rq, stop


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _candidate_scores(
    rq,
    summ_base,
    stride_sn,
    start,
    cols,
    offs_d,
    query_block,
    num_blocks,
    num_summaries,
    D: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    SUBS: tl.constexpr,
):
    """Routing scores ``[BLOCK_M, BLOCK_N]`` of the blocks ``start + cols``, -inf where not a candidate.

    ``SUBS`` summaries per block (``SSAConfig.summaries_per_block``): a block scores as its best
    sub-block (``summary="max"``), one ``[BLOCK_M, BLOCK_N]`` product per sub-block position, so the
    tile stays the size of a one-summary block's. ``IEEE``: float32 inputs are multiplied in full
    precision (not TF32), so the ranking is the reference's; bf16/fp16 products are exact in the fp32
    accumulator anyway. Chunks without masks take :func:`_interior_scores`."""
    blocks = start + cols
    if SUBS == 1:
        summ = tl.load(
            summ_base + blocks.to(tl.int64)[None, :] * stride_sn + offs_d[:, None],
            mask=(blocks[None, :] < num_blocks) & (offs_d[:, None] < D),
            other=0.0,
        )
        s = _dot(rq, summ, IEEE)
    else:
        s = tl.full([rq.shape[0], cols.shape[0]], float("-inf"), tl.float32)
        for j in range(SUBS):
            sub = blocks * SUBS + j
            summ = tl.load(
                summ_base + sub.to(tl.int64)[None, :] * stride_sn + offs_d[:, None],
                mask=(sub[None, :] < num_summaries) & (offs_d[:, None] < D),
                other=0.0,
            )
            # Sub-blocks past the last key (a partial last block) take no part in the maximum.
            s = tl.maximum(s, tl.where(sub[None, :] < num_summaries, _dot(rq, summ, IEEE), float("-inf")))
    ok = _is_candidate(blocks[None, :], query_block[:, None], SINK, LOCAL, num_blocks, CAUSAL)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _interior_scores(
    rq, summ_ptrs, stride_sn, offs_d, D: tl.constexpr, IEEE: tl.constexpr, SUBS: tl.constexpr
):
    """:func:`_candidate_scores` of a chunk whose blocks are all complete candidates of every row (no
    masks), from the pointers to its blocks' first summaries (``[BLOCK_D, BLOCK_N]``): a loop advances
    them by a chunk, where recomputing each row's 64-bit address cost ~40 instructions a chunk."""
    s = _dot(rq, tl.load(summ_ptrs, mask=offs_d[:, None] < D, other=0.0), IEEE)
    for j in range(1, SUBS):
        summ = tl.load(summ_ptrs + j * stride_sn, mask=offs_d[:, None] < D, other=0.0)
        s = tl.maximum(s, _dot(rq, summ, IEEE))
    return s


@triton.jit
def _group_max_kernel(
    RQ,
    SUMM,
    OUT,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    num_groups,
    block_size,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUBS: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    rows, row_ok, query_block, rq, stop = _routing_rows(
        RQ,
        stride_rb,
        stride_rt,
        stride_rh,
        b,
        h,
        tile,
        T,
        pos_offset,
        num_blocks,
        block_size,
        offs_d,
        D,
        BLOCK_M,
        LOCAL,
        CAUSAL,
    )
    out_base = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * num_groups
    groups_per_chunk: tl.constexpr = BLOCK_N // GROUP
    cols = tl.arange(0, BLOCK_N)
    summ_base = SUMM + b.to(tl.int64) * stride_sb + h * stride_sh
    for start in range(0, stop, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            False,
            SUBS,
        )
        gmax = tl.max(tl.reshape(s, [BLOCK_M, groups_per_chunk, GROUP]), axis=2)
        groups = start // GROUP + tl.arange(0, groups_per_chunk)
        tl.store(out_base + groups[None, :], gmax, mask=row_ok[:, None] & (groups[None, :] < num_groups))


def _summary_layout(summaries: torch.Tensor, config) -> tuple[int, int, int]:
    """(key blocks, summaries, summaries per block) of ``[B, NS, Hkv, D]`` summaries under ``config``."""
    per_block = config.summaries_per_block
    return -(-summaries.shape[1] // per_block), summaries.shape[1], per_block


def group_max_scores(
    rq: torch.Tensor, summaries: torch.Tensor, pos_offset: int, config, group: int, causal: bool
) -> torch.Tensor:
    """Max routing score per group of ``group`` candidate blocks: ``[B, Hkv, T, NG]`` fp32, -inf if none.

    rq: ``[B, T, Hkv, D]`` routing queries of tokens at positions ``pos_offset + i``;
    summaries: ``[B, NS, Hkv, D]`` routing summaries (same dtype; ``config.summaries_per_block`` a block).
    """
    batch, seq_len_q, heads, dim = rq.shape
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    num_groups = -(-num_blocks // group)
    out = torch.full((batch, heads, seq_len_q, num_groups), float("-inf"), device=rq.device)
    block_m, block_n = 64, max(64, group)
    grid = (triton.cdiv(seq_len_q, block_m), batch * heads)
    _group_max_kernel[grid](
        rq,
        summaries,
        out,
        rq.stride(0),
        rq.stride(1),
        rq.stride(2),
        summaries.stride(0),
        summaries.stride(1),
        summaries.stride(2),
        seq_len_q,
        pos_offset,
        heads,
        num_blocks,
        num_summaries,
        num_groups,
        config.block_size,
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GROUP=group,
        SINK=config.sink_blocks,
        LOCAL=config.local_blocks,
        CAUSAL=causal,
        SUBS=per_block,
        num_warps=4,
        num_stages=2,
    )
    return out


@triton.jit
def _top_groups_kernel(
    RQ,
    SUMM,
    OUT,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    block_size,
    num_out,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    K_PAD: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUBS: tl.constexpr,
):
    """As ``_group_max_kernel``, but keeps each row's best ``K_PAD`` groups in registers instead of
    writing every group maximum: a chunk of ``GROUP * K_PAD`` blocks yields ``K_PAD`` group maxima,
    merged into the running top-k."""
    BLOCK_N: tl.constexpr = GROUP * K_PAD
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    rows, row_ok, query_block, rq, stop = _routing_rows(
        RQ,
        stride_rb,
        stride_rt,
        stride_rh,
        b,
        h,
        tile,
        T,
        pos_offset,
        num_blocks,
        block_size,
        offs_d,
        D,
        BLOCK_M,
        LOCAL,
        CAUSAL,
    )
    best = tl.full([BLOCK_M, K_PAD], -1, tl.int64)
    cols = tl.arange(0, BLOCK_N)
    summ_base = SUMM + b.to(tl.int64) * stride_sb + h * stride_sh
    for start in range(0, stop, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            False,
            SUBS,
        )
        gmax = tl.max(tl.reshape(s, [BLOCK_M, K_PAD, GROUP]), axis=2)
        groups = start // GROUP + tl.arange(0, K_PAD)
        best = _merge_top(best, _pack_keys(gmax, groups[None, :], gmax > float("-inf")), BLOCK_M, K_PAD)
    best = tl.sort(best, descending=True)
    slots = tl.arange(0, K_PAD)
    picked = tl.where(best >= 0, (best & 0xFFFFFFFF).to(tl.int32), -1)
    out_ptrs = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * num_out + slots[None, :]
    tl.store(out_ptrs, picked, mask=row_ok[:, None] & (slots[None, :] < num_out))


def top_groups(
    rq: torch.Tensor, summaries: torch.Tensor, pos_offset: int, config, group: int, causal: bool
) -> torch.Tensor:
    """The ``top_k`` groups with the highest candidate-block maximum: ``[B, Hkv, T, top_k]`` int32."""
    batch, seq_len_q, heads, dim = rq.shape
    k_pad = max(16, triton.next_power_of_2(config.top_k))
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    out = torch.empty(batch, heads, seq_len_q, config.top_k, device=rq.device, dtype=torch.int32)
    block_m = 64
    grid = (triton.cdiv(seq_len_q, block_m), batch * heads)
    _top_groups_kernel[grid](
        rq,
        summaries,
        out,
        rq.stride(0),
        rq.stride(1),
        rq.stride(2),
        summaries.stride(0),
        summaries.stride(1),
        summaries.stride(2),
        seq_len_q,
        pos_offset,
        heads,
        num_blocks,
        num_summaries,
        config.block_size,
        config.top_k,
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=block_m,
        GROUP=group,
        K_PAD=k_pad,
        SINK=config.sink_blocks,
        LOCAL=config.local_blocks,
        CAUSAL=causal,
        SUBS=per_block,
        num_warps=8,
        num_stages=2,
    )
    return out


@triton.jit
def _probed_rows(
    RQ,
    SUMM,
    GROUPS,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_slots,
    block_size,
    BLOCK_M: tl.constexpr,
):
    """A rescore program's token rows, their key blocks, and the bases of their probed group ids,
    routing queries and (batch, KV head) summaries."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    query_block = (rows + pos_offset) // block_size
    groups_base = GROUPS + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * num_slots
    rq_base = RQ + b.to(tl.int64) * stride_rb + rows.to(tl.int64)[:, None, None] * stride_rt + h * stride_rh
    summ_base = SUMM + b.to(tl.int64) * stride_sb + h * stride_sh
    return rows, row_ok, query_block, groups_base, rq_base, summ_base


@triton.jit
def _probed_scores(
    rq_base,
    summ_base,
    stride_sn,
    groups_base,
    row_ok,
    query_block,
    col,
    width,
    num_blocks,
    num_summaries,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUBS: tl.constexpr,
):
    """Scores ``[BLOCK_M, W]`` of the blocks at positions ``col`` ``[W]`` of each row's virtual list of
    probed blocks (block ``j`` of the row's ``i``-th group at ``i * GROUP + j``), with the block ids and
    whether each is a candidate of the row (scores of non-candidates are 0, not -inf). With ``SUBS``
    summaries per block, a block's best sub-block."""
    group_id = tl.load(
        groups_base + (col // GROUP)[None, :], mask=row_ok[:, None] & (col < width)[None, :], other=-1
    )
    block = group_id * GROUP + (col % GROUP)[None, :]
    ok = (group_id >= 0) & _is_candidate(block, query_block[:, None], SINK, LOCAL, num_blocks, CAUSAL)
    best = tl.full(block.shape, float("-inf"), tl.float32)
    for j in range(SUBS):
        sub = block * SUBS + j
        inside = ok & (sub < num_summaries)  # a partial last block (non-causal) lacks its last sub-blocks
        score = tl.zeros(block.shape, tl.float32)
        for d0 in range(0, BLOCK_D, 32):
            d = d0 + tl.arange(0, 32)[None, None, :]
            q = tl.load(rq_base + d, mask=row_ok[:, None, None] & (d < D), other=0.0).to(tl.float32)
            s = tl.load(
                summ_base + sub.to(tl.int64)[:, :, None] * stride_sn + d,
                mask=inside[:, :, None] & (d < D),
                other=0.0,
            ).to(tl.float32)
            score += tl.sum(q * s, axis=2)
        best = tl.maximum(best, tl.where(inside | ~ok, score, float("-inf")))
    return best, block, ok


@triton.jit
def _rescore_topk_kernel(
    RQ,
    SUMM,
    GROUPS,
    OUT,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    num_slots,
    block_size,
    top_k,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    K_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUBS: tl.constexpr,
):
    bh = tl.program_id(1)
    rows, row_ok, query_block, groups_base, rq_base, summ_base = _probed_rows(
        RQ,
        SUMM,
        GROUPS,
        stride_rb,
        stride_rt,
        stride_rh,
        stride_sb,
        stride_sh,
        T,
        pos_offset,
        HKV,
        num_slots,
        block_size,
        BLOCK_M,
    )
    cols = tl.arange(0, K_PAD)
    # Running top-k as packed keys (_pack_keys); -1 = empty.
    best = tl.full([BLOCK_M, K_PAD], -1, tl.int64)
    width = num_slots * GROUP
    for start in range(0, width, K_PAD):
        score, block, ok = _probed_scores(
            rq_base,
            summ_base,
            stride_sn,
            groups_base,
            row_ok,
            query_block,
            start + cols,
            width,
            num_blocks,
            num_summaries,
            D,
            BLOCK_D,
            GROUP,
            SINK,
            LOCAL,
            CAUSAL,
            SUBS,
        )
        best = _merge_top(best, _pack_keys(score, block, ok), BLOCK_M, K_PAD)
    best = tl.sort(best, descending=True)
    picked = tl.where(best >= 0, (best & 0xFFFFFFFF).to(tl.int32), -1)
    out_ptrs = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * top_k + cols[None, :]
    tl.store(out_ptrs, picked, mask=row_ok[:, None] & (cols[None, :] < top_k))


@triton.jit
def _probed_scores_kernel(
    RQ,
    SUMM,
    GROUPS,
    OUT,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    num_slots,
    block_size,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
    GROUP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUBS: tl.constexpr,
):
    """Every probed block's score, ``OUT[b, h, t, i * GROUP + j]`` for block ``j`` of the row's ``i``-th
    group; -inf where it is not a candidate."""
    bh = tl.program_id(1)
    rows, row_ok, query_block, groups_base, rq_base, summ_base = _probed_rows(
        RQ,
        SUMM,
        GROUPS,
        stride_rb,
        stride_rt,
        stride_rh,
        stride_sb,
        stride_sh,
        T,
        pos_offset,
        HKV,
        num_slots,
        block_size,
        BLOCK_M,
    )
    cols = tl.arange(0, BLOCK_W)
    width = num_slots * GROUP
    out_base = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * width
    for start in range(0, width, BLOCK_W):
        col = start + cols
        score, block, ok = _probed_scores(
            rq_base,
            summ_base,
            stride_sn,
            groups_base,
            row_ok,
            query_block,
            col,
            width,
            num_blocks,
            num_summaries,
            D,
            BLOCK_D,
            GROUP,
            SINK,
            LOCAL,
            CAUSAL,
            SUBS,
        )
        tl.store(
            out_base + col[None, :],
            tl.where(ok, score, float("-inf")),
            mask=row_ok[:, None] & (col < width)[None, :],
        )


# Largest padded budget rescored by the in-register merge: each chunk's ``tl.topk`` over ``2 K_PAD``
# packed keys unrolls into a sorting network that Triton compiles for 10 s at ``K_PAD`` 16 (32 rows),
# 83 s at 32 and minutes at 64 (sm_90, benchmarks/NOTES.md item 25). Larger budgets write the probed
# scores and take ``torch.topk``.
_MERGE_MAX_K_PAD = 16
# Probed-score elements held at once (fp32) by the ``torch.topk`` rescore.
_RESCORE_CHUNK_ELEMENTS = 1 << 27


def rescore_topk(
    rq: torch.Tensor,
    summaries: torch.Tensor,
    groups: torch.Tensor,
    pos_offset: int,
    config,
    group: int,
    causal: bool,
) -> torch.Tensor:
    """Top-k candidate blocks among the probed groups: ``[B, Hkv, T, top_k]`` int32 sorted by score,
    -1 padded.

    groups: ``[B, Hkv, T, P]`` int32 group ids (-1 = none); a block of a group is scored only if it is
    a routing candidate of the token.
    """
    top_k = config.top_k
    k_pad = max(16, triton.next_power_of_2(top_k))
    if k_pad > _MERGE_MAX_K_PAD:
        return _rescore_topk_sorted(rq, summaries, groups, pos_offset, config, group, causal)
    batch, seq_len_q, heads, dim = rq.shape
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    block_m = 32
    groups = groups.contiguous()
    out = torch.empty(batch, heads, seq_len_q, top_k, device=rq.device, dtype=torch.int32)
    grid = (triton.cdiv(seq_len_q, block_m), batch * heads)
    _rescore_topk_kernel[grid](
        rq,
        summaries,
        groups,
        out,
        rq.stride(0),
        rq.stride(1),
        rq.stride(2),
        summaries.stride(0),
        summaries.stride(1),
        summaries.stride(2),
        seq_len_q,
        pos_offset,
        heads,
        num_blocks,
        num_summaries,
        groups.shape[-1],
        config.block_size,
        top_k,
        D=dim,
        BLOCK_D=max(32, triton.next_power_of_2(dim)),
        BLOCK_M=block_m,
        K_PAD=k_pad,
        GROUP=group,
        SINK=config.sink_blocks,
        LOCAL=config.local_blocks,
        CAUSAL=causal,
        SUBS=per_block,
        num_warps=4,
    )
    return out


def _rescore_topk_sorted(rq, summaries, groups, pos_offset, config, group, causal) -> torch.Tensor:
    """:func:`rescore_topk` for large budgets: the probed blocks' scores (``_probed_scores_kernel``),
    then ``torch.topk``, a chunk of tokens at a time."""
    batch, seq_len_q, heads, dim = rq.shape
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    width = groups.shape[-1] * group
    top_k = config.top_k
    out = torch.full((batch, heads, seq_len_q, top_k), -1, device=rq.device, dtype=torch.int32)
    block_m, block_w = 16, 32
    chunk = max(block_m, _RESCORE_CHUNK_ELEMENTS // max(1, batch * heads * width))
    for start in range(0, seq_len_q, chunk):
        stop = min(seq_len_q, start + chunk)
        groups_c = groups[:, :, start:stop].contiguous()  # the kernel reads rows of num_slots ids
        scores = torch.empty(batch, heads, stop - start, width, device=rq.device, dtype=torch.float32)
        grid = (triton.cdiv(stop - start, block_m), batch * heads)
        _probed_scores_kernel[grid](
            rq[:, start:stop],
            summaries,
            groups_c,
            scores,
            rq.stride(0),
            rq.stride(1),
            rq.stride(2),
            summaries.stride(0),
            summaries.stride(1),
            summaries.stride(2),
            stop - start,
            pos_offset + start,
            heads,
            num_blocks,
            num_summaries,
            groups.shape[-1],
            config.block_size,
            D=dim,
            BLOCK_D=max(32, triton.next_power_of_2(dim)),
            BLOCK_M=block_m,
            BLOCK_W=block_w,
            GROUP=group,
            SINK=config.sink_blocks,
            LOCAL=config.local_blocks,
            CAUSAL=causal,
            SUBS=per_block,
            num_warps=4,
        )
        values, slots = scores.topk(min(top_k, width), dim=-1)
        blocks = groups_c.gather(-1, slots // group) * group + slots % group
        out[:, :, start:stop, : values.shape[-1]] = torch.where(values > float("-inf"), blocks, -1)
    return out


@triton.jit
def _record_best(
    list_ptrs, key, start, count, CAP: tl.constexpr, BLOCK_N: tl.constexpr, IN_PLACE: tl.constexpr
):
    """One extraction step of :func:`_record_passing`: each token's best key, stored if it passed."""
    best = tl.max(key, axis=1)
    found = best >= BLOCK_N
    entry = (best.to(tl.int64) << 32) | (start + (best & (BLOCK_N - 1))).to(tl.int64)
    fused.store_as_held(list_ptrs + count, entry, found & (count < CAP), IN_PLACE)
    return best, count + found.to(tl.int32)


@triton.jit
def _record_passing(
    s, tau, start, cols, list_ptrs, count, CAP: tl.constexpr, BLOCK_N: tl.constexpr, IN_PLACE: tl.constexpr
):
    """Store a chunk's blocks scoring above ``tau`` in the per-token lists at ``list_ptrs`` (``CAP``
    entries a token, in arrival order, as ``key << 32 | block``), one per token per step, best first;
    ``count`` counts the blocks that passed. A list stops at ``CAP`` (``count > CAP``: cut, many
    near-equal scores; the repair launch redoes its tile with :func:`_keep_best_passing`). ``tau`` is
    below the k-th best score, so ``>`` keeps every block ``>=`` would that can be in the top-k.

    A score's key is ``d = s - tau`` as int32 with its column in the low ``log2(BLOCK_N)`` mantissa
    bits: positive ``d`` (the blocks that pass) order as integers as the floats do (up to the truncated
    bits: with 64 columns, blocks whose ``d`` differ by under 2^-17 of it order by column), the others
    are below ``BLOCK_N``, and no two columns of a row share a key. So a step is an integer max with no
    index, and with no ties the lanes holding a row cannot disagree on it (an index reduction needs a
    tie-break for that, 3-5 instructions a score; NOTES item 93), then the removal of that one key, and
    a store a token where the lists in registers took a ``[BLOCK_M, CAP]`` update a step (item 95). The
    steps are counted first: one tile-wide reduction per chunk, not a tile-wide test after every step
    (that cost more than the steps themselves)."""
    floor = tl.where(count <= CAP, tau, float("inf"))  # a cut list takes no more (bounds the steps on ties)
    steps = tl.max(tl.sum(tl.where(s > floor[:, None], 1.0, 0.0), axis=1)).to(tl.int32)
    # The keys are made in the first step (at 12M most chunks take none), the removal at the top of the
    # later ones (none after the last).
    key = tl.zeros_like(s).to(tl.int32)
    best = tl.zeros_like(count)
    for step in range(steps):
        if step == 0:
            key = ((s - floor[:, None]).to(tl.int32, bitcast=True) & -BLOCK_N) | cols[None, :]
        else:
            key = tl.where(key == best[:, None], -1, key)
        best, count = _record_best(list_ptrs, key, start, count, CAP, BLOCK_N, IN_PLACE)
    return count


@triton.jit
def _keep_best_passing(s, tau, start, cols, slots, vals, ids):
    """Move a chunk's blocks scoring above ``tau`` into the per-token lists ``vals``/``ids`` in registers,
    each into its list's lowest slot (-inf while there is room) and only if it scores higher, so a list
    holds the best ``CAP`` that passed and is never cut; exact ties with a full list (repeated text)
    take no steps. Its row minima cost ~14% against :func:`_record_passing`'s arrival order on random
    inputs (layer-8b at 1M: 167 vs 146 ms; NOTES item 73), so after a full pass 1 it only repairs the
    tiles whose lists were cut; after a sampled one (many more blocks pass) it is the only mode.

    A token's passing blocks are its highest scores in the chunk, so the steps take them from the scores
    as they are (item 93); one compare a score against a per-token floor, the count as a float sum (an
    integer sum of the mask compiled to bit-packing, item 92)."""
    floor = tl.maximum(tau, tl.min(vals, axis=1))
    for _ in range(tl.max(tl.sum(tl.where(s > floor[:, None], 1.0, 0.0), axis=1)).to(tl.int32)):
        # Keep the index tie-break: without it the lanes holding one row can disagree on which of two
        # equal scores is the maximum, and record one block but remove another (item 93).
        best, col = tl.max(s, axis=1, return_indices=True)
        low, slot = tl.min(vals, axis=1, return_indices=True)
        found = (best > floor) & (best > low)
        put = found[:, None] & (slots[None, :] == slot[:, None])
        vals = tl.where(put, best[:, None], vals)
        ids = tl.where(put, start + col[:, None], ids)
        s = tl.where(cols[None, :] == col[:, None], float("-inf"), s)
    return vals, ids


@triton.jit
def _take_passing(
    s,
    tau,
    start,
    cols,
    slots,
    vals,
    ids,
    list_ptrs,
    count,
    CAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEEP_BEST: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    """A chunk's passing blocks into the lists: :func:`_keep_best_passing` or :func:`_record_passing`."""
    if KEEP_BEST:
        vals, ids = _keep_best_passing(s, tau, start, cols, slots, vals, ids)
    else:
        count = _record_passing(s, tau, start, cols, list_ptrs, count, CAP, BLOCK_N, IN_PLACE)
    return vals, ids, count


@triton.jit
def _threshold_topk_kernel(
    RQ,
    SUMM,
    COUNT,
    OUT,
    LISTS,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    block_size,
    top_k,
    tile_start,
    list_rows,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    CAP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    SUBS: tl.constexpr,
    SAMPLE: tl.constexpr,
    KEEP_BEST: tl.constexpr,
    REPAIR: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    """Exact top-k of a tile of tokens in two passes over their candidate blocks.

    Pass 1 keeps, per token, the maximum score of each column of the ``BLOCK_N``-wide chunks: the
    blocks ``c, c + BLOCK_N, c + 2 BLOCK_N, ...`` form one group, so the k-th largest of these
    maxima, ``tau``, is a score that k different blocks reach: the k-th best block scores at least
    ``tau``. (Candidates are contiguous ranges, so a token with k candidates has k non-empty
    columns; with fewer, every candidate passes.) Pass 2 recomputes the same scores and stores the
    blocks scoring above ``tau`` (about k per token on random inputs, a few per chunk) in a per-token
    list of ``CAP`` in ``LISTS``, one per token per step (:func:`_record_passing`); the top-k of the
    list is the answer. ``COUNT`` gets how many blocks passed: above ``CAP`` a list was cut (many
    near-equal scores). ``REPAIR=True`` (a second launch) redoes only the tiles with a cut list,
    keeping the best ``CAP`` of each list in registers (``KEEP_BEST``, :func:`_keep_best_passing`), so
    the answer is exact without the host looking. A launch runs the tiles from ``tile_start``; its
    lists hold ``list_rows`` tokens a KV head.

    ``SAMPLE > 1``: pass 1 scores only every ``SAMPLE``-th chunk of the unmasked middle (the masked
    chunks at both ends always). Its maxima are still scores of distinct candidate blocks, so tau stays
    a score that k blocks reach, only lower: about ``SAMPLE`` times as many blocks pass, so the lists keep
    the best from the start (``KEEP_BEST``, one launch). Pass 1 costs ``1 / SAMPLE`` of a pass.

    Causal: the chunks that hold only candidates of every token of the tile (after the sink chunk,
    before the first token's local window; most of them) are scored without masks.
    """
    tile = tile_start + tl.program_id(0)
    bh = tl.program_id(1)
    if REPAIR:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        if tl.max(tl.load(COUNT + bh.to(tl.int64) * T + rows, mask=rows < T, other=0)) <= CAP:
            return
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    rows, row_ok, query_block, rq, stop = _routing_rows(
        RQ,
        stride_rb,
        stride_rt,
        stride_rh,
        b,
        h,
        tile,
        T,
        pos_offset,
        num_blocks,
        block_size,
        offs_d,
        D,
        BLOCK_M,
        LOCAL,
        CAUSAL,
    )
    cols = tl.arange(0, BLOCK_N)
    summ_base = SUMM + b.to(tl.int64) * stride_sb + h * stride_sh
    # Chunks [0, head_end) and [mid_end, stop) are masked, [head_end, mid_end) are all candidates.
    head_end = tl.minimum((SINK + BLOCK_N - 1) // BLOCK_N * BLOCK_N, tl.maximum(stop, 0))
    mid_end = head_end
    if CAUSAL:
        first_free = tl.maximum((tile * BLOCK_M + pos_offset) // block_size - LOCAL + 1, 0)
        mid_end = tl.maximum(head_end, first_free // BLOCK_N * BLOCK_N)

    colmax = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    for start in range(0, head_end, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            IEEE,
            SUBS,
        )
        colmax = tl.maximum(colmax, s)
    summ_ptrs = summ_base + (head_end + cols).to(tl.int64)[None, :] * SUBS * stride_sn + offs_d[:, None]
    for _ in range(head_end, mid_end, BLOCK_N * SAMPLE):
        s = _interior_scores(rq, summ_ptrs, stride_sn, offs_d, D, IEEE, SUBS)
        summ_ptrs += BLOCK_N * SAMPLE * SUBS * stride_sn.to(tl.int64)
        colmax = tl.maximum(colmax, s)
    for start in range(mid_end, stop, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            IEEE,
            SUBS,
        )
        colmax = tl.maximum(colmax, s)
    kth = tl.topk(colmax, K_PAD)  # [BLOCK_M, K_PAD], descending
    tau = tl.max(tl.where(tl.arange(0, K_PAD)[None, :] == top_k - 1, kth, float("-inf")), axis=1)
    # Slack against the two passes rounding one score differently (they run the same dot, so they
    # should not): it only lets a few more blocks into the lists.
    tau = tau - (tl.abs(tau) + 1.0) * 1e-5
    # A token with fewer than k candidates (tau = -inf) takes every one, and no -inf. Its candidates
    # are fewer than a chunk's columns and contiguous, so each is the only one of its column: the
    # lowest finite column maximum is its lowest score (+inf, none passes, if it has none). A floor
    # near the scores keeps _record_passing's keys ``s - floor`` as precise as the scores.
    lowest = tl.min(tl.where(colmax > float("-inf"), colmax, float("inf")), axis=1)
    lowest = lowest - (tl.abs(tl.minimum(lowest, 3.4e38)) + 1.0) * 1e-5  # +inf stays +inf, not NaN
    tau = tl.where(tau > float("-inf"), tau, lowest)

    slots = tl.arange(0, CAP)
    count = tl.zeros([BLOCK_M], tl.int32)
    # The lists: kept best in registers, or this launch's tiles' lists in memory (the unused ones cost
    # nothing: the compiler drops them).
    vals = tl.full([BLOCK_M, CAP], float("-inf"), tl.float32)
    ids = tl.full([BLOCK_M, CAP], -1, tl.int32)
    list_ptrs = (
        LISTS + ((bh * list_rows + (tile - tile_start) * BLOCK_M).to(tl.int64) + tl.arange(0, BLOCK_M)) * CAP
    )
    for start in range(0, head_end, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            IEEE,
            SUBS,
        )
        vals, ids, count = _take_passing(
            s, tau, start, cols, slots, vals, ids, list_ptrs, count, CAP, BLOCK_N, KEEP_BEST, IN_PLACE
        )
    summ_ptrs = summ_base + (head_end + cols).to(tl.int64)[None, :] * SUBS * stride_sn + offs_d[:, None]
    for start in range(head_end, mid_end, BLOCK_N):
        s = _interior_scores(rq, summ_ptrs, stride_sn, offs_d, D, IEEE, SUBS)
        summ_ptrs += BLOCK_N * SUBS * stride_sn.to(tl.int64)
        vals, ids, count = _take_passing(
            s, tau, start, cols, slots, vals, ids, list_ptrs, count, CAP, BLOCK_N, KEEP_BEST, IN_PLACE
        )
    for start in range(mid_end, stop, BLOCK_N):
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            IEEE,
            SUBS,
        )
        vals, ids, count = _take_passing(
            s, tau, start, cols, slots, vals, ids, list_ptrs, count, CAP, BLOCK_N, KEEP_BEST, IN_PLACE
        )
    if KEEP_BEST:
        keys = _pack_keys(vals, ids, ids >= 0)
    else:
        tl.store(COUNT + bh.to(tl.int64) * T + rows, count, mask=row_ok)
        tl.debug_barrier()  # the lists' entries were stored by other threads of the program
        keys = tl.load(list_ptrs[:, None] + slots[None, :], mask=slots[None, :] < count[:, None], other=-1)
    top = tl.topk(keys, K_PAD)
    picked = tl.where(top >= 0, (top & 0xFFFFFFFF).to(tl.int32), -1)
    out_cols = tl.arange(0, K_PAD)
    out_ptrs = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * top_k + out_cols[None, :]
    tl.store(out_ptrs, picked, mask=row_ok[:, None] & (out_cols[None, :] < top_k))


# Threshold top-k launch: tokens per program, blocks per chunk, list slots per token (x K_PAD),
# pipeline stages (swept on an H200, benchmarks/NOTES.md items 19, 36 and 104). The largest budget it
# takes: at top_k=64 (lists of 128 per token) it was slower than top groups + rescore (64K tokens: 118 vs
# 93 ms), at 16 twice as fast (1M: 187 vs 405 ms; item 19).
_THRESHOLD_BLOCK_M = 128
_THRESHOLD_BLOCK_N = 64
_THRESHOLD_CAP_PER_K = 2
_THRESHOLD_NUM_STAGES = 3
_THRESHOLD_MAX_TOP_K = 16
# Warps a program. One summary a block: 8, two warpgroups of 64 rows sharing each summary tile; with the
# register cap below an SM runs 16 warps instead of 12 of 64-token programs of 4 warps (layer-8b at 1M
# 104.1 -> 92.1 ms; 256 tokens over 16 warps, one program an SM, 100-105 ms; item 104). Several sub-block
# summaries a block: 4 (each chunk loads that many summary tiles; nano `max4` at 1M: 4.6 against 6.8 ms
# with 64 tokens a program, item 36; routing every token, 57.1 against 68.5 ms with 8 warps, item 104).
_THRESHOLD_NUM_WARPS = 8
_THRESHOLD_SUBS_NUM_WARPS = 4
# Register cap (Triton's ``maxnreg``; 0: none) for one summary a block and head dims up to
# ``_THRESHOLD_CAP_MAX_DIM``: at 128 the layer-8b kernel does not spill and two programs (16 warps) share
# an SM; capped at 168 it takes 138, one program an SM: 124.9 ms at 1M against 92.1 (item 104). Wider rows
# (the beam's level-2 nodes score 256-wide ``[q+, q-]``) need twice the shared memory and spilled at a
# cap (item 94). Sub-block summaries' larger tiles already spill uncapped, and are left alone.
_THRESHOLD_MAX_REGISTERS = 128
_THRESHOLD_CAP_MAX_DIM = 128
# Pass 1 scores every SAMPLE-th middle chunk (kernel docstring), by summaries per block: (one, several).
_THRESHOLD_SAMPLE = (1, 4)
# Its two passes read the summaries twice. Programs run one KV head at a time (tiles vary fastest), so
# one head's summaries are the working set: while they fit in L2 the second read is cheap (4 MB at 1M
# for layer-8b, 25 MB at 12M for `small`: faster), past it the kernel streams them from HBM twice
# (`long` at 12M, 50 MB: 11.8 s vs 10.4 s for top groups + rescore). Blocks scored by several sub-block
# summaries are the exception: there top groups pays for every sub-block too, and the threshold kernel
# stays faster at any length (nano `max4`, last 32K tokens: 2M 9.0 vs 22.8 ms, 12M 54.6 vs 114.9 ms;
# benchmarks/NOTES.md item 70).
_THRESHOLD_MAX_HEAD_BYTES = 32 << 20
# Memory for the lists of a full pass 1's launch (``8 * CAP`` bytes a token and KV head: 2 KB a token at
# layer-8b, 2 GiB for 1M tokens at once); larger inputs launch in groups of tiles.
_THRESHOLD_LIST_BYTES = 512 << 20


def _threshold_launch(dim: int, config, per_block: int, causal: bool, ieee: bool) -> tuple[dict, dict, tuple]:
    """The threshold kernel's compile-time constants, launch options and (keep the best, repair) of each
    launch, for a head dim, a config, summaries per block, causality and float32 (IEEE) inputs.
    ``scripts/kernel_resources.py`` compiles the kernel from the same values."""
    k_pad = max(16, triton.next_power_of_2(config.top_k))
    sample = _THRESHOLD_SAMPLE[per_block > 1]
    constants = dict(
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=_THRESHOLD_BLOCK_M,
        BLOCK_N=max(_THRESHOLD_BLOCK_N, k_pad),
        K_PAD=k_pad,
        CAP=_THRESHOLD_CAP_PER_K * k_pad,
        SINK=config.sink_blocks,
        LOCAL=config.local_blocks,
        CAUSAL=causal,
        IEEE=ieee,
        SUBS=per_block,
        SAMPLE=sample,
    )
    capped = per_block == 1 and dim <= _THRESHOLD_CAP_MAX_DIM
    options = dict(
        num_warps=_THRESHOLD_NUM_WARPS if per_block == 1 else _THRESHOLD_SUBS_NUM_WARPS,
        num_stages=_THRESHOLD_NUM_STAGES,
        maxnreg=(_THRESHOLD_MAX_REGISTERS or None) if capped else None,
    )
    # A full first pass's lists are cut and repaired, a sampled one's keep the best.
    launches = ((False, False), (True, True)) if sample == 1 else ((True, False),)
    return constants, options, launches


def threshold_topk(
    rq: torch.Tensor, summaries: torch.Tensor, pos_offset: int, config, causal: bool
) -> torch.Tensor:
    """Exact flat top-k (``_threshold_topk_kernel``: with a full pass 1, a second launch repairs the
    tiles whose lists were cut; with a sampled one, one launch whose lists keep the best):
    ``[B, Hkv, T, top_k]`` int32 block ids sorted by score, -1 padded. A full pass 1's lists live in
    memory, ``8 * CAP`` bytes a token and head, so the tiles launch in groups whose lists take at most
    ``_THRESHOLD_LIST_BYTES``."""
    batch, seq_len_q, heads, dim = rq.shape
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    count = torch.empty(batch, heads, seq_len_q, device=rq.device, dtype=torch.int32)
    out = torch.empty(batch, heads, seq_len_q, config.top_k, device=rq.device, dtype=torch.int32)
    ieee = rq.dtype == torch.float32
    constants, options, launches = _threshold_launch(dim, config, per_block, causal, ieee)
    block_m, cap = constants["BLOCK_M"], constants["CAP"]
    num_tiles = triton.cdiv(seq_len_q, block_m)
    tile_bytes = batch * heads * block_m * cap * 8
    tiles_per_launch = min(num_tiles, max(1, _THRESHOLD_LIST_BYTES // tile_bytes))
    in_memory = any(not keep_best for keep_best, _ in launches)
    lists = torch.empty(
        tiles_per_launch * tile_bytes // 8 if in_memory else 1, device=rq.device, dtype=torch.int64
    )
    for tile_start in range(0, num_tiles, tiles_per_launch):
        grid = (min(tiles_per_launch, num_tiles - tile_start), batch * heads)
        for keep_best, repair in launches:
            _threshold_topk_kernel[grid](
                rq,
                summaries,
                count,
                out,
                lists,
                rq.stride(0),
                rq.stride(1),
                rq.stride(2),
                summaries.stride(0),
                summaries.stride(1),
                summaries.stride(2),
                seq_len_q,
                pos_offset,
                heads,
                num_blocks,
                num_summaries,
                config.block_size,
                config.top_k,
                tile_start,
                tiles_per_launch * block_m,
                KEEP_BEST=keep_best,
                REPAIR=repair,
                IN_PLACE=fused.inline_ptx(rq.device),
                **constants,
                **options,
            )
    return out


def threshold_pays(summaries: torch.Tensor, config) -> bool:
    """Whether :func:`threshold_topk` measured faster than group top-k + rescore for these inputs: a
    budget of at most ``_THRESHOLD_MAX_TOP_K``, and blocks scored by sub-blocks or one KV head's
    summaries within ``_THRESHOLD_MAX_HEAD_BYTES``."""
    if config.top_k > _THRESHOLD_MAX_TOP_K:
        return False
    head_bytes = summaries.shape[1] * summaries.shape[3] * summaries.element_size()
    return config.summaries_per_block > 1 or head_bytes <= _THRESHOLD_MAX_HEAD_BYTES


# The integers that move with a decode step are not specialised on: a new pattern of them being 1 or a
# multiple of 16 would compile a variant mid-generation.
@triton.jit(do_not_specialize=["T", "pos_offset", "num_blocks", "num_summaries"])
def _split_scores_kernel(
    RQ,
    SUMM,
    OUT,
    stride_rb,
    stride_rt,
    stride_rh,
    stride_sb,
    stride_sn,
    stride_sh,
    T,
    pos_offset,
    HKV,
    num_blocks,
    num_summaries,
    block_size,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    SUBS: tl.constexpr,
):
    """Every candidate score of a few tokens, ``OUT [B * Hkv, T, NB]`` (-inf where not a candidate):
    program ``(chunk, tile, b * Hkv + h)`` scores one chunk of ``BLOCK_N`` blocks for one tile of
    tokens, so the blocks, not the tokens, spread over the GPU."""
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    rows, row_ok, query_block, rq, stop = _routing_rows(
        RQ,
        stride_rb,
        stride_rt,
        stride_rh,
        b,
        h,
        tile,
        T,
        pos_offset,
        num_blocks,
        block_size,
        offs_d,
        D,
        BLOCK_M,
        LOCAL,
        CAUSAL,
    )
    start = chunk * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    if start < stop:
        summ_base = SUMM + b.to(tl.int64) * stride_sb + h * stride_sh
        s = _candidate_scores(
            rq,
            summ_base,
            stride_sn,
            start,
            cols,
            offs_d,
            query_block,
            num_blocks,
            num_summaries,
            D,
            SINK,
            LOCAL,
            CAUSAL,
            IEEE,
            SUBS,
        )
    else:  # after the tile's last candidate (causal): nothing to score
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    blocks = start + cols
    out_ptrs = OUT + (bh.to(tl.int64) * T + rows.to(tl.int64)[:, None]) * num_blocks + blocks[None, :]
    tl.store(out_ptrs, s, mask=row_ok[:, None] & (blocks[None, :] < num_blocks))


# Few tokens against many blocks (a decode step: one token a row). The tile kernels above give each
# (tile of tokens, KV head) one program walking every block, so one token at 12M is one program for
# 196K blocks while the rest of the GPU idles. Tokens up to ``_SPLIT_MAX_TOKENS`` against at least
# ``_SPLIT_MIN_SUMMARIES`` summaries (a walking program's work) are routed by :func:`split_topk`
# instead, whose programs split the blocks. On an H200, with one summary a block the walk was as fast
# or faster up to 128K keys (2,048 summaries; layer-8b, one token: 0.110 against 0.143 ms); from 16,384
# summaries on the split won on every shape measured (nano `max4`, one token: 1M 2.70 -> 0.18 ms, 12M
# 30.9 -> 0.33 ms; benchmarks/NOTES.md item 76).
_SPLIT_MAX_TOKENS = 64
_SPLIT_MIN_SUMMARIES = 16384
_SPLIT_BLOCK_N = 64


def split_pays(seq_len_q: int, num_summaries: int) -> bool:
    """Whether :func:`split_topk` routes ``seq_len_q`` tokens over ``num_summaries`` summaries."""
    return seq_len_q <= _SPLIT_MAX_TOKENS and num_summaries >= _SPLIT_MIN_SUMMARIES


def split_topk(
    rq: torch.Tensor, summaries: torch.Tensor, pos_offset: int, config, causal: bool
) -> torch.Tensor:
    """Exact flat top-k for a few tokens (``_split_scores_kernel``, then ``torch.topk``): ``[B, Hkv, T,
    top_k]`` int32 block ids sorted by score, -1 padded. The scores are the threshold kernel's
    (``_candidate_scores``); only tied blocks may come in another order."""
    from subquad.ops.ssa.select import _topk_blocks

    batch, seq_len_q, heads, dim = rq.shape
    num_blocks, num_summaries, per_block = _summary_layout(summaries, config)
    block_m = max(16, min(64, triton.next_power_of_2(seq_len_q)))
    # Token rows scored per launch: their score matrix stays within _CHUNK_ELEMENTS at any length.
    rows_per_call = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * num_blocks))
    out = []
    for first in range(0, seq_len_q, rows_per_call):
        rq_c = rq[:, first : first + rows_per_call]
        rows = rq_c.shape[1]
        scores = torch.empty(batch, heads, rows, num_blocks, device=rq.device, dtype=torch.float32)
        grid = (triton.cdiv(num_blocks, _SPLIT_BLOCK_N), triton.cdiv(rows, block_m), batch * heads)
        _split_scores_kernel[grid](
            rq_c,
            summaries,
            scores,
            rq_c.stride(0),
            rq_c.stride(1),
            rq_c.stride(2),
            summaries.stride(0),
            summaries.stride(1),
            summaries.stride(2),
            rows,
            pos_offset + first,
            heads,
            num_blocks,
            num_summaries,
            config.block_size,
            D=dim,
            BLOCK_D=max(16, triton.next_power_of_2(dim)),
            BLOCK_M=block_m,
            BLOCK_N=_SPLIT_BLOCK_N,
            SINK=config.sink_blocks,
            LOCAL=config.local_blocks,
            CAUSAL=causal,
            IEEE=rq.dtype == torch.float32,
            SUBS=per_block,
            num_warps=4,
            num_stages=2,
        )
        out.append(_topk_blocks(scores, None, config.top_k))
    return torch.cat(out, dim=2)


@triton.jit
def _sum_query_heads_kernel(
    Q, OUT, num_rows, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr
):
    """Rows ``(b, t, kv head)`` of OUT: the float32 sum of the ``GROUP`` query heads of the row, in
    OUT's dtype (contiguous ``[B, T, Hkv * GROUP, D]`` in, ``[B, T, Hkv, D]`` out)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for g in tl.static_range(GROUP):
        acc += tl.load(Q + (rows * GROUP + g)[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(OUT + rows[:, None] * D + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


# Rows a program of the head sum: 32 x 128 x 4 heads of bf16 = 32 KB of loads in flight a program.
_SUM_ROWS = 32


def sum_query_heads(q: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``select.routing_queries`` in one pass over q (no gradient): ``[B, T, Hq, D]`` -> ``[B, T, Hkv, D]``
    in ``dtype``, summed in float32. At 1M tokens of layer-8b 2.4 ms, where PyTorch's reduction over the
    group dim took 5.7 (benchmarks/NOTES.md item 102)."""
    batch, seq_len, heads, dim = q.shape
    q = q.contiguous()
    out = torch.empty(batch, seq_len, num_kv_heads, dim, device=q.device, dtype=dtype)
    num_rows = batch * seq_len * num_kv_heads
    if num_rows:
        _sum_query_heads_kernel[(triton.cdiv(num_rows, _SUM_ROWS),)](
            q,
            out,
            num_rows,
            GROUP=heads // num_kv_heads,
            D=dim,
            BLOCK_D=triton.next_power_of_2(dim),
            ROWS=_SUM_ROWS,
            num_warps=4,
        )
    return out


FLAT_GROUP = 16
# Blocks scored per step of the fused group top-k (its score tile is [64, GROUP * K_PAD] fp32).
_FUSED_MAX_BLOCKS = 256
# Group-score elements held at once (fp32): bounds memory at any length.
_CHUNK_ELEMENTS = 1 << 28


def route_flat_triton(
    rq,
    summaries,
    seq_len_k,
    config,
    causal,
    group: int = FLAT_GROUP,
    threshold: bool | None = None,
    split: bool | None = None,
):
    """Exact flat top-k (module docstring): rq ``[B, T, Hkv, D]``, summaries ``[B, NS, Hkv, D]`` (a block's,
    or with ``summary="max"`` its sub-blocks', scored as the best of them).

        ``split``: use :func:`split_topk` (default: a few tokens against many blocks, ``split_pays``).
        ``threshold``: use :func:`threshold_topk` (default: where it measured faster, small budgets and one
        head's summaries within L2), else group top-k + rescore.
    """
    batch, seq_len_q, heads, _ = rq.shape
    if split is None:
        split = split_pays(seq_len_q, summaries.shape[1])
    if split:
        return split_topk(rq, summaries, seq_len_k - seq_len_q, config, causal)
    if threshold is None:
        threshold = threshold_pays(summaries, config)
    if threshold:
        return threshold_topk(rq, summaries, seq_len_k - seq_len_q, config, causal)
    k_pad = max(16, triton.next_power_of_2(config.top_k))
    num_groups = -(-_summary_layout(summaries, config)[0] // group)
    chunk = max(64, _CHUNK_ELEMENTS // max(1, batch * heads * num_groups))
    out = []
    # Small budgets keep the group top-k in registers: no group-score matrix, so no need to chunk.
    fused = group * k_pad <= _FUSED_MAX_BLOCKS
    if fused:
        chunk = seq_len_q
    for start in range(0, seq_len_q, chunk):
        rq_c = rq[:, start : start + chunk]
        offset = seq_len_k - seq_len_q + start
        if fused:
            groups = top_groups(rq_c, summaries, offset, config, group, causal)
        else:
            gmax = group_max_scores(rq_c, summaries, offset, config, group, causal)
            values, groups = gmax.topk(min(config.top_k, num_groups), dim=-1)
            groups = torch.where(torch.isfinite(values), groups, -1).to(torch.int32)
        out.append(rescore_topk(rq_c, summaries, groups, offset, config, group, causal))
    return torch.cat(out, dim=2)


def route_tree_triton(rq, summaries, seq_len_k, config, causal):
    """Tree routing: group bounds in PyTorch (``NB / G`` per token), rescoring in Triton."""
    from subquad.ops.ssa.select import tree_bounds, tree_probe_groups, tree_shape

    batch, seq_len_q, heads, _ = rq.shape
    num_blocks = summaries.shape[1]
    group, _ = tree_shape(num_blocks, config)
    bounds = tuple(t.to(rq.dtype) for t in tree_bounds(summaries, config, group))
    # Chunks of tokens whose bounds (and their int64 keys, select.best_of_stretches) stay bounded.
    chunk = max(64, _CHUNK_ELEMENTS // max(1, 4 * batch * heads * bounds[0].shape[2]))
    out = []
    for start in range(0, seq_len_q, chunk):
        rq_c = rq[:, start : start + chunk]
        offset = seq_len_k - seq_len_q + start
        groups = tree_probe_groups(rq_c, bounds, num_blocks, offset, config, causal)
        out.append(rescore_topk(rq_c, summaries, groups, offset, config, group, causal))
    return torch.cat(out, dim=2)


def route_beam_triton(rq, summaries, seq_len_k, config, causal):
    """The beam index (``select._route_beam``) from the flat router's kernels: the level-2 nodes by
    :func:`route_flat_triton`, the level-1 nodes and the blocks by :func:`rescore_topk`.

    Nodes are scored as blocks of ``block_size * F**level`` keys by ``[q+, q-] . [hi, lo]``. A token may
    probe a node that ends before its local window: shifting the token's position back to its window's
    first key makes that the kernels' own test for a window of one block (``local_blocks=1``). Tokens
    whose window starts in block 0 get negative positions; whichever way the kernels round their
    division, those admit no node.
    """
    from subquad.ops.ssa.config import SSAConfig
    from subquad.ops.ssa.select import (
        _window_starts,
        beam_check_causal,
        beam_levels,
        beam_queries,
        beam_shape,
    )

    beam_check_causal(causal)
    batch, seq_len_q, heads, dim = rq.shape
    fanout, width = beam_shape(config)
    level1, level2 = (t.to(rq.dtype).contiguous() for t in beam_levels(summaries, config))
    bs, shift = config.block_size, (config.local_blocks - 1) * config.block_size
    levels = [
        SSAConfig(
            block_size=bs * fanout**n,
            top_k=width,
            sink_blocks=config.sink_blocks // fanout**n,
            local_blocks=1,
        )
        for n in (1, 2)
    ]
    # Query features and node ids of a chunk stay within _CHUNK_ELEMENTS.
    chunk = max(64, _CHUNK_ELEMENTS // max(1, batch * heads * (2 * dim + 2 * (width + 1))))
    out = []
    for start in range(0, seq_len_q, chunk):
        rq_c = rq[:, start : start + chunk]
        count, offset = rq_c.shape[1], seq_len_k - seq_len_q + start
        feats = beam_queries(rq_c)
        window = _window_starts(offset, count, config, rq.device)
        parents = route_flat_triton(feats, level2, offset - shift + count, levels[1], True)
        # The kept nodes' children, and the complete ones of the parent the token's window starts in.
        for table, query, pos, level, span in (
            (level1, feats, offset - shift, levels[0], fanout**2),
            (summaries, rq_c, offset, config, fanout),
        ):
            straddled = (window // span).to(torch.int32).view(1, 1, -1, 1).expand(batch, heads, -1, 1)
            parents = rescore_topk(
                query, table, torch.cat([parents, straddled], dim=-1), pos, level, fanout, True
            )
        out.append(parents)
    return torch.cat(out, dim=2)


# --- Decode: the tree router for one new token per row, in two launches -------------------------------
# The PyTorch step (``triton_decode._route_tree_step``) is ~25 small kernels, each a launch that costs
# more than its work at any context length. Here: (A) one program per stretch of probe-able groups
# (``select.best_of_stretches``) bounds them, takes the best and scores its blocks, one per group touching
# the window scores that group's; (B) one program per (row, KV head) merges A's lists and writes the whole
# selection, sink and local slots included (the fused decode step's split-K attention picks instead).
# The integers that move with the context are not specialised on (Triton would compile a variant for
# each new pattern of them being 1 or a multiple of 16, mid-generation; a graphed step re-captures
# without an eager step first, and a compile there would have to run under the capture).


@triton.jit
def _tree_lists_program(
    Q,
    HI,
    LO,
    SUMM,
    PART,
    COS,
    SIN,
    POS,
    b,
    h,
    bh,
    slot,
    stride_qb,
    stride_qh,
    stride_hb,
    stride_hh,
    stride_hg,
    stride_sb,
    stride_sn,
    stride_sh,
    probe,
    group,
    window_first,
    window_last,
    last_candidate,
    sink_blocks,
    local_blocks,
    num_blocks,
    num_groups,
    GROUP_Q: tl.constexpr,
    BLOCK_GQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    K_PAD: tl.constexpr,
    NUM_GROUP_SLOTS: tl.constexpr,
    FROM_QKV: tl.constexpr,
    BS: tl.constexpr,
    PDL: tl.constexpr,
):
    """A slot of _decode_tree_lists_kernel (see there)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    probing = slot < probe
    # select.best_of_stretches' stretch of the groups before the window: slot, slot + probe, ...
    groups = slot + probe * tl.arange(0, SPAD)
    bounded = probing & (groups < num_groups) & ((groups + 1) * group > sink_blocks)
    base = (
        b.to(tl.int64) * stride_hb
        + h * stride_hh
        + groups.to(tl.int64)[:, None] * stride_hg
        + offs_d[None, :]
    )
    # The bounds before the PDL wait: no kernel of a decode step writes them (the cache layer updates
    # its kept bounds with PyTorch ops before the step's routing, and only when a group fills). Masked
    # by the rows held, not by the window, which may come from the position: the loads need not wait
    # for that one (a group in the window is left out below).
    hi = tl.load(HI + base, mask=bounded[:, None] & d_ok[None, :], other=0.0)
    lo = tl.load(LO + base, mask=bounded[:, None] & d_ok[None, :], other=0.0)
    if FROM_QKV:  # as fused._rotate_append_program, which says why these may load before the wait
        pos, block, cos, sin = fused._token_tables(POS, COS, SIN, offs_d, d_ok, D, BS)
        # What moves with the token's key block, from its position (as triton_decode._tree_step): a
        # graphed step replays one launch across key blocks.
        last_candidate = block - local_blocks
        window_first = tl.maximum(block - local_blocks + 1, 0) // group
        window_last = block // group
        num_blocks = block + 1
    g_ok = bounded & (groups < window_first)
    pdl.wait(PDL)
    qh = tl.arange(0, BLOCK_GQ)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + (h * GROUP_Q + qh)[:, None] * stride_qh
    q_ok = (qh < GROUP_Q)[:, None] & d_ok[None, :]
    if FROM_QKV:  # the heads rotated and rounded as the ones the reference routes with
        q = fused._rotated_heads(q_ptrs, cos, sin, offs_d, q_ok, D).to(Q.dtype.element_ty).to(tl.float32)
    else:
        q = tl.load(q_ptrs + offs_d[None, :], mask=q_ok, other=0.0).to(tl.float32)
    rq = tl.sum(q, 0)  # select.routing_queries: the sum of the KV head's query heads
    bound = tl.sum(tl.maximum(rq, 0.0)[None, :] * hi + tl.minimum(rq, 0.0)[None, :] * lo, 1)
    best = tl.max(_pack_keys(bound, groups, g_ok), 0)
    own = window_first + slot - probe
    gid = tl.where(probing, tl.where(best >= 0, (best & 0xFFFFFFFF).to(tl.int32), -1),
                   tl.where(own <= window_last, own, -1))  # fmt: skip
    member = tl.arange(0, BLOCK_G)
    blocks = gid * group + member
    ok = (gid >= 0) & (member < group) & (blocks >= sink_blocks) & (blocks <= last_candidate)
    ok = ok & (blocks < num_blocks)
    summ = tl.load(
        SUMM
        + b.to(tl.int64) * stride_sb
        + blocks.to(tl.int64)[:, None] * stride_sn
        + h * stride_sh
        + offs_d[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    score = tl.sum(rq[None, :] * summ.to(tl.float32), 1)
    keys = _pack_keys(score, blocks, ok)[None, :]
    if BLOCK_G > K_PAD:
        keys = tl.topk(keys, K_PAD)
    cols = tl.arange(0, K_PAD)
    tl.store(PART + (bh.to(tl.int64) * NUM_GROUP_SLOTS + slot) * K_PAD + cols[None, :], keys)


@triton.jit(
    do_not_specialize=["probe", "window_first", "window_last", "last_candidate", "num_blocks", "num_groups"]
)
def _decode_tree_lists_kernel(
    Q,
    HI,
    LO,
    SUMM,
    PART,
    COS,
    SIN,
    POS,
    Q_OUT,
    KEY_BUF,
    VALUE_BUF,
    MEANS,
    stride_qb,
    stride_qh,
    stride_hb,
    stride_hh,
    stride_hg,
    stride_sb,
    stride_sn,
    stride_sh,
    s_kb_b,
    s_kb_s,
    s_kb_h,
    s_vb_b,
    s_vb_s,
    s_vb_h,
    s_m_b,
    s_m_n,
    s_m_h,
    HKV,
    probe,
    group,
    window_first,
    window_last,
    last_candidate,
    sink_blocks,
    local_blocks,
    num_blocks,
    num_groups,
    GROUP_Q: tl.constexpr,
    BLOCK_GQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    K_PAD: tl.constexpr,
    NUM_GROUP_SLOTS: tl.constexpr,
    FROM_QKV: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row x KV head, slot). Slot < ``probe``: the routing query against the bounds of the
    slot-th stretch of the ``window_first`` groups before the window (``select.best_of_stretches``;
    groups of sink blocks only left out), and the best group's blocks scored; slots ``probe ..``: the
    groups touching the token's window. Each writes its best ``K_PAD`` blocks as packed keys into
    ``PART [B * Hkv, NUM_GROUP_SLOTS, K_PAD]``.

    ``FROM_QKV``: ``Q`` is the q/k/v projection's output (``[B, 1, Hq + 2 Hkv, D]``, strides of its rows
    and heads), rotated here with the token's tables; slot ``NUM_GROUP_SLOTS`` (one program more) rotates
    and appends the token as ``fused.rotate_append_decode_token`` (into Q_OUT and the cache's buffers).
    The window and the block count then come from the position ``POS`` (the arguments are not read), so
    one launch serves every key block of one layout (:func:`tree_lists_layout`)."""
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    # The lists program is written twice so that only the FROM_QKV variant compiles the append program
    # (a runtime `slot == NUM_GROUP_SLOTS` test would keep it in both).
    if FROM_QKV:
        if slot == NUM_GROUP_SLOTS:
            fused._rotate_append_program(
                Q,
                COS,
                SIN,
                Q_OUT,
                KEY_BUF,
                VALUE_BUF,
                MEANS,
                POS,
                b.to(tl.int64),
                h.to(tl.int64),
                HKV,
                stride_qb,
                stride_qh,
                s_kb_b,
                s_kb_s,
                s_kb_h,
                s_vb_b,
                s_vb_s,
                s_vb_h,
                s_m_b,
                s_m_n,
                s_m_h,
                GROUP_Q,
                D,
                BS,
                BLOCK_GQ,
                BLOCK_S,
                BLOCK_D,
                PDL,
            )
        else:
            _tree_lists_program(
                Q,
                HI,
                LO,
                SUMM,
                PART,
                COS,
                SIN,
                POS,
                b,
                h,
                bh,
                slot,
                stride_qb,
                stride_qh,
                stride_hb,
                stride_hh,
                stride_hg,
                stride_sb,
                stride_sn,
                stride_sh,
                probe,
                group,
                window_first,
                window_last,
                last_candidate,
                sink_blocks,
                local_blocks,
                num_blocks,
                num_groups,
                GROUP_Q,
                BLOCK_GQ,
                D,
                BLOCK_D,
                SPAD,
                BLOCK_G,
                K_PAD,
                NUM_GROUP_SLOTS,
                FROM_QKV,
                BS,
                PDL,
            )
    else:
        _tree_lists_program(
            Q,
            HI,
            LO,
            SUMM,
            PART,
            COS,
            SIN,
            POS,
            b,
            h,
            bh,
            slot,
            stride_qb,
            stride_qh,
            stride_hb,
            stride_hh,
            stride_hg,
            stride_sb,
            stride_sn,
            stride_sh,
            probe,
            group,
            window_first,
            window_last,
            last_candidate,
            sink_blocks,
            local_blocks,
            num_blocks,
            num_groups,
            GROUP_Q,
            BLOCK_GQ,
            D,
            BLOCK_D,
            SPAD,
            BLOCK_G,
            K_PAD,
            NUM_GROUP_SLOTS,
            FROM_QKV,
            BS,
            PDL,
        )


@triton.jit
def _decode_pick_kernel(
    PART_B,
    FIXED,
    OUT,
    stride_fb,
    stride_ob,
    stride_oh,
    HKV,
    top_k,
    NUM_FIXED: tl.constexpr,
    FIXED_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    NUM_GROUP_SLOTS: tl.constexpr,
    SLOTS_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row x KV head): the sink and local slots, then the ``top_k`` best of B's lists."""
    pdl.wait(PDL)
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    out = OUT + b.to(tl.int64) * stride_ob + h * stride_oh
    fcols = tl.arange(0, FIXED_PAD)
    fixed = tl.load(FIXED + b.to(tl.int64) * stride_fb + fcols, mask=fcols < NUM_FIXED, other=-1)
    tl.store(out + fcols, fixed, mask=fcols < NUM_FIXED)
    slots = tl.arange(0, SLOTS_PAD)
    cols = tl.arange(0, K_PAD)
    keys = tl.load(
        PART_B + (bh.to(tl.int64) * NUM_GROUP_SLOTS + slots[:, None]) * K_PAD + cols[None, :],
        mask=(slots < NUM_GROUP_SLOTS)[:, None],
        other=-1,
    )
    top = tl.sort(tl.topk(tl.reshape(keys, [1, SLOTS_PAD * K_PAD]), K_PAD), descending=True)
    picked = tl.where(top >= 0, (top & 0xFFFFFFFF).to(tl.int32), -1)
    tl.store(out + NUM_FIXED + cols[None, :], picked, mask=cols[None, :] < top_k)


def decode_route_tree(q, summaries, hi, lo, fixed, step, config) -> torch.Tensor:
    """The tree router's selection for one new token per row, rows of one length (``triton_decode``'s
    ``_TreeStep`` ``step``): ``[B, Hkv, F + top_k]`` int32, the sink and local slots ``fixed``
    (``[B, 1, F]`` int32) first, as ``decode_select``.

    q: ``[B, Hq, D]`` (the new token's query heads); summaries: ``[B, NB, Hkv, D]``; hi / lo:
    ``[B, Hkv, NG, D]`` float32 group bounds, valid for the groups before the token's window.
    """
    part_b, group_slots, k_pad = decode_tree_lists(q, summaries, hi, lo, step, config)
    batch, heads_kv, num_fixed = q.shape[0], summaries.shape[2], fixed.shape[-1]
    out = torch.empty(batch, heads_kv, num_fixed + config.top_k, device=q.device, dtype=torch.int32)
    fixed = fixed.contiguous()
    _decode_pick_kernel[(batch * heads_kv,)](
        part_b,
        fixed,
        out,
        fixed.stride(0),
        out.stride(0),
        out.stride(1),
        heads_kv,
        config.top_k,
        NUM_FIXED=num_fixed,
        FIXED_PAD=max(2, triton.next_power_of_2(num_fixed)),
        K_PAD=k_pad,
        NUM_GROUP_SLOTS=group_slots,
        SLOTS_PAD=max(2, triton.next_power_of_2(group_slots)),
        num_warps=4,
        **pdl.launch_args(q.device),
    )
    return out


def tree_lists_layout(step) -> tuple[int, int, int, int]:
    """What :func:`decode_tree_lists` bakes into its launch for the ``_TreeStep`` ``step`` besides the
    tensors: ``(group, probe, group slots, SPAD)``, SPAD the stretches' padded length. With the append
    (``FROM_QKV``) nothing else in the launch moves with the token's key block, so a graphed decode step
    replays one capture while this stays the same and the bounds' and cache's buffers stay put."""
    stretch = -(-step.window_first // step.probe)  # groups in the longest stretch
    spad = max(2, triton.next_power_of_2(stretch))
    return step.group, step.probe, step.probe + step.own.numel(), spad


def decode_tree_lists(q, summaries, hi, lo, step, config, append=None) -> tuple[torch.Tensor, int, int]:
    """The first kernel of :func:`decode_route_tree` (same arguments): the candidate lists its pick
    merges, ``(part [B * Hkv, lists, k_pad] packed keys, lists, k_pad)``.

    ``append``: ``(cos, sin, pos, q_out, key_buf, value_buf, means)``. ``q`` is then the q/k/v projection's
    output ``[B, 1, Hq + 2 Hkv, D]``, and the kernel also rotates the token's heads and appends it to the
    cache (``fused.rotate_append_decode_token``'s arguments; the rotated queries into ``q_out``), and the
    token's window and block count come from ``pos``: ``summaries`` may then be a view of a longer buffer
    holding later blocks' rows, and ``hi`` / ``lo`` hold rows for groups past the window too (a step
    captured in an earlier key block: the kept bounds' whole buffers).
    """
    batch, dim = q.shape[0], q.shape[-1]
    heads_kv = summaries.shape[2]
    heads_q = q.shape[-2] - 2 * heads_kv if append is not None else q.shape[1]
    if hi.stride() != lo.stride() or hi.stride(-1) != 1 or q.stride(-1) != 1 or summaries.stride(-1) != 1:
        raise ValueError("decode_route_tree: q, summaries and the bounds need a contiguous last dimension")
    k_pad = max(16, triton.next_power_of_2(config.top_k))
    _, _, group_slots, spad = tree_lists_layout(step)
    part = torch.empty(batch * heads_kv * group_slots * k_pad, device=q.device, dtype=torch.int64)
    if append is None:  # the append's arguments unused: q in the tensors' places, strides 0
        cos = sin = pos = q_out = key_buf = value_buf = means = q
        cache_strides = [0] * 9
        stride_qb, stride_qh = q.stride(0), q.stride(1)
    else:
        cos, sin, pos, q_out, key_buf, value_buf, means = append
        cache_strides = [*key_buf.stride()[:3], *value_buf.stride()[:3], *means.stride()[:3]]
        stride_qb, stride_qh = q.stride(0), q.stride(2)
    window_last = (step.last_candidate + config.local_blocks) // step.group  # the token's own group
    _decode_tree_lists_kernel[(batch * heads_kv, group_slots + (append is not None))](
        q, hi, lo, summaries, part, cos, sin, pos, q_out, key_buf, value_buf, means,
        stride_qb, stride_qh, hi.stride(0), hi.stride(1), hi.stride(2),
        summaries.stride(0), summaries.stride(1), summaries.stride(2), *cache_strides,
        heads_kv, step.probe, step.group, step.window_first, window_last,
        step.last_candidate, config.sink_blocks, config.local_blocks, summaries.shape[1], hi.shape[2],
        GROUP_Q=heads_q // heads_kv, BLOCK_GQ=max(2, triton.next_power_of_2(heads_q // heads_kv)), D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), SPAD=spad,
        BLOCK_G=max(k_pad, triton.next_power_of_2(step.group)), K_PAD=k_pad, NUM_GROUP_SLOTS=group_slots,
        FROM_QKV=append is not None, BS=config.block_size, BLOCK_S=triton.next_power_of_2(config.block_size),
        num_warps=4 if step.group <= 32 else 8,
        enable_fp_fusion=append is None,  # the rotation rounded as PyTorch rounds it (fused._rotated_heads)
        **pdl.launch_args(q.device),
    )  # fmt: skip
    return part, group_slots, k_pad
