"""Grouping a chunk's routed pairs by block (``triton_routed.routed_work``: a stable CUB radix sort of
int32 keys, then segments from searchsorted) against a counting sort in two Triton kernels with atomics
(counts per (kv head, block), then each pair scattered to its block's next free place: no order among a
block's tokens). Layer-8b at 1M: chunks of 64K tokens, 8 KV heads, 16 routed slots, 16K blocks."""

import torch
import triton
import triton.language as tl

from subquad.benchmark import median_timer
from subquad.ops.ssa import tiles, triton_routed


@triton.jit
def _pair_keys(
    IDX, stride_b, stride_h, stride_t, HKV, tokens, num_blocks, R: tl.constexpr, TOK: tl.constexpr
):
    bh = tl.program_id(1)
    t = tl.program_id(0) * TOK + tl.arange(0, TOK)
    r = tl.arange(0, R)
    ok = (t < tokens)[:, None] & (r >= 0)[None, :]
    base = IDX + (bh // HKV).to(tl.int64) * stride_b + (bh % HKV).to(tl.int64) * stride_h
    blk = tl.load(base + t.to(tl.int64)[:, None] * stride_t + r[None, :], mask=ok, other=-1)
    return bh * num_blocks + blk, ok & (blk >= 0), t[:, None] * R + r[None, :]


@triton.jit
def _count_kernel(
    IDX, COUNTS, stride_b, stride_h, stride_t, HKV, tokens, num_blocks, R: tl.constexpr, TOK: tl.constexpr
):
    key, valid, _ = _pair_keys(IDX, stride_b, stride_h, stride_t, HKV, tokens, num_blocks, R, TOK)
    tl.atomic_add(COUNTS + key, 1, mask=valid, sem="relaxed")


@triton.jit
def _scatter_kernel(
    IDX,
    CURSOR,
    PAIRS,
    stride_b,
    stride_h,
    stride_t,
    HKV,
    tokens,
    num_blocks,
    R: tl.constexpr,
    TOK: tl.constexpr,
):
    key, valid, entry = _pair_keys(IDX, stride_b, stride_h, stride_t, HKV, tokens, num_blocks, R, TOK)
    pos = tl.atomic_add(CURSOR + key, 1, mask=valid, sem="relaxed")
    tl.store(PAIRS + pos, entry, mask=valid)


def counted_work(routed_idx, num_blocks, segment_tokens, tok=64):
    batch, heads, chunk_len, slots = routed_idx.shape
    owners = batch * heads * num_blocks
    counts = torch.zeros(owners, device=routed_idx.device, dtype=torch.int32)
    grid = (triton.cdiv(chunk_len, tok), batch * heads)
    args = (routed_idx.stride(0), routed_idx.stride(1), routed_idx.stride(2), heads, chunk_len, num_blocks)
    _count_kernel[grid](routed_idx, counts, *args, R=slots, TOK=tok)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    cursor = ends - counts
    starts = cursor.clone()
    pairs = torch.empty(routed_idx.numel(), device=routed_idx.device, dtype=torch.int32)
    _scatter_kernel[grid](routed_idx, cursor, pairs, *args, R=slots, TOK=tok)
    # Segments as tiles.segment_owners cuts them, from the counts instead of a search of sorted keys.
    segs = -(-counts // segment_tokens)
    seg_ends = torch.cumsum(segs, 0)
    bound = tiles.max_segments_for(routed_idx.numel(), owners, segment_tokens)
    seg = torch.arange(bound, device=counts.device)
    seg_owner = torch.searchsorted(seg_ends, seg, right=True)
    used = seg_owner < owners
    seg_owner = seg_owner.clamp(max=owners - 1)
    seg_start = starts[seg_owner] + (seg - (seg_ends - segs)[seg_owner]) * segment_tokens
    seg_end = torch.minimum(seg_start + segment_tokens, ends[seg_owner])
    out = tuple(torch.where(used, x, 0).to(torch.int32) for x in (seg_owner, seg_start, seg_end))
    return (*out, pairs)


def main():
    torch.manual_seed(0)
    heads, chunk, slots, num_blocks, fixed = 8, 65536, 16, 16384, 3
    # A selection laid out as select_blocks' ([B, Hkv, T, fixed + routed]), the chunk a strided view of
    # its routed slots: 16 distinct random blocks a token, late tokens of a 1M sequence.
    scores = torch.rand(1, heads, chunk, num_blocks, device="cuda", dtype=torch.float16)
    routed = scores.topk(slots, dim=-1).indices.to(torch.int32)
    del scores
    sel = torch.cat([torch.zeros(1, heads, chunk, fixed, device="cuda", dtype=torch.int32), routed], -1)
    chunk_idx = sel[..., fixed:]
    timer = median_timer(torch.device("cuda"), warmup=3, reps=20)
    old = triton_routed.routed_work(chunk_idx, num_blocks, 256)
    new = counted_work(chunk_idx, num_blocks, 256)
    # Same segments (owner, start, end) and the same pairs in each segment's range, in any order.
    same_segments = all(torch.equal(a, b) for a, b in zip(old[:3], new[:3]))
    n = int((chunk_idx >= 0).sum())
    owner_of = torch.repeat_interleave(
        torch.arange(heads * num_blocks, device="cuda"),
        torch.bincount(
            (torch.arange(heads, device="cuda").view(1, heads, 1, 1) * num_blocks + chunk_idx).flatten(),
            minlength=heads * num_blocks,
        ),
    )
    key_old = (owner_of * chunk * slots + old[3][:n].long()).sort().values
    key_new = (owner_of * chunk * slots + new[3][:n].long()).sort().values
    print(f"segments equal: {same_segments}; pairs per block equal: {torch.equal(key_old, key_new)}")
    for tok in (32, 64, 128):
        t_new = timer(lambda tok=tok: counted_work(chunk_idx, num_blocks, 256, tok))
        print(f"counting sort, {tok} tokens a program: {t_new:.3f} ms a chunk")
    t_old = timer(lambda: triton_routed.routed_work(chunk_idx, num_blocks, 256))
    print(f"routed_work (CUB radix sort): {t_old:.3f} ms a chunk; x16 chunks at 1M: {16 * t_old:.1f} ms")


if __name__ == "__main__":
    main()
