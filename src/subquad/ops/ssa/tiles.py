"""Work lists for the Triton kernels, built from a per-token selection with plain tensor ops.

Selection is per token, but the matrix units want tiles of rows. A *query tile* is ``tokens_per_tile``
consecutive tokens of one KV head (times its ``Hq // Hkv`` query heads, one row each). The kernels
visit the **union** of the tile's selected blocks, and a per-block bitmask (bit ``t`` set when token
``t`` of the tile chose the block) masks each row to its own selection, so the result is exactly
per-token attention. ``union size / mean selection size`` is the work overhead (see
:func:`tile_overhead`).

The key-major backward (dK, dV) walks the same pairs from the other side: for each key block, the
query tiles whose union holds it (:func:`invert_tiles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QueryTiles:
    """Per query tile (``bh`` = batch * Hkv + kv head): the sorted union of selected blocks.

    blocks: ``[BH, NT, U]`` int32 block ids, ascending, ``-1`` after ``count``.
    masks: ``[BH, NT, U]`` int64, bit ``t`` = token ``t`` of the tile selected that block.
    count: ``[BH, NT]`` int32 union sizes.
    """

    blocks: torch.Tensor
    masks: torch.Tensor
    count: torch.Tensor
    tokens_per_tile: int


@dataclass
class KeyBlockWork:
    """Segments of (key block, query tiles) work for the dK/dV kernel.

    seg_block: ``[NS]`` int32 ``bh * NB + block``; seg_start / seg_end: ``[NS]`` int32 ranges into
    ``tiles`` / ``masks`` (``[P]`` int32 tile ids and int64 bitmasks, grouped by key block).
    """

    seg_block: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    tiles: torch.Tensor
    masks: torch.Tensor


def build_query_tiles(block_idx: torch.Tensor, tokens_per_tile: int) -> QueryTiles:
    """Union of each query tile's selections with per-token bitmasks, without a host sync.

    block_idx: ``[B, Hkv, T, K]`` int32 (``-1`` = unused); ``tokens_per_tile`` <= 64 (one int64 bit each).
    The union width ``U`` is its bound ``tokens_per_tile * K`` (the kernels stop at ``count``): the
    exact width is a device value, and reading it would stall every prefill chunk and layer.
    """
    if not 1 <= tokens_per_tile <= 64:
        raise ValueError(f"tokens_per_tile={tokens_per_tile}: expected 1..64 (one int64 bit per token)")
    batch, heads, seq_len_q, slots = block_idx.shape
    num_tiles = -(-seq_len_q // tokens_per_tile)
    pad = num_tiles * tokens_per_tile - seq_len_q
    idx = block_idx.long()
    if pad:
        idx = torch.nn.functional.pad(idx, (0, 0, 0, pad), value=-1)
    width = max(1, tokens_per_tile * slots)
    idx = idx.view(batch * heads, num_tiles, tokens_per_tile * slots)
    token = torch.arange(tokens_per_tile, device=idx.device).repeat_interleave(slots)
    valid = idx >= 0
    # Sorting (block, token) keys groups each block's tokens together, blocks ascending.
    sentinel = torch.iinfo(torch.int64).max
    key = torch.where(valid, idx * tokens_per_tile + token, sentinel)
    key, _ = key.sort(dim=-1)
    valid = key != sentinel
    blocks = torch.where(valid, key // tokens_per_tile, -1)
    bits = torch.where(valid, torch.ones_like(key) << (key % tokens_per_tile), 0)
    first = valid.clone()
    first[..., 1:] &= blocks[..., 1:] != blocks[..., :-1]
    count = first.sum(-1)
    # Entries past the last block have bits 0 and id -1: clamped into range, they change nothing.
    segment = (first.long().cumsum(-1) - 1).clamp(min=0)
    # A block's bits are distinct powers of two, so their sum is their OR.
    masks = torch.zeros(*key.shape[:-1], width, dtype=torch.int64, device=key.device)
    masks.scatter_add_(-1, segment, bits)
    # Each block's first entry holds its id, the rest -1: the max per segment is the id.
    ids = torch.where(first, blocks, -1)
    union = torch.full_like(masks, -1).scatter_reduce_(-1, segment, ids, reduce="amax")
    return QueryTiles(union.to(torch.int32), masks, count.to(torch.int32), tokens_per_tile)


def invert_tiles(tiles: QueryTiles, num_blocks: int, max_tiles_per_segment: int = 256) -> KeyBlockWork:
    """Group the (query tile, key block) pairs by key block, cut into segments of bounded length.

    Long lists (sink blocks are in every tile's union) are split so that no program walks all tiles
    alone; the dK/dV kernel adds the segments of one block together.
    """
    bh_count, num_tiles, width = tiles.blocks.shape
    flat_blocks = tiles.blocks.flatten()
    pos = (flat_blocks >= 0).nonzero()[:, 0]  # host sync: the number of pairs
    bh = pos // (num_tiles * width)
    tile = pos // width % num_tiles
    owner = bh * num_blocks + flat_blocks[pos].long()  # [P] flat key block id
    order = (owner * num_tiles + tile).argsort()
    seg_block, seg_start, seg_end = segment_owners(owner[order], bh_count * num_blocks, max_tiles_per_segment)
    return KeyBlockWork(
        seg_block, seg_start, seg_end, tile[order].to(torch.int32), tiles.masks.flatten()[pos[order]]
    )


def segment_owners(
    sorted_owner: torch.Tensor, num_owners: int, segment_len: int, max_segments: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a list sorted by owner (ids ``0 .. num_owners - 1``; larger ids are ignored) into segments of
    at most ``segment_len`` items of one owner each: int32 ``(owner, start, end)`` per segment, owners
    ascending.

    ``max_segments``: return that many segments, the unused ones empty (owner 0, ``start == end == 0``)
    at the end, without a host sync; it must be at least the number needed
    (:func:`max_segments_for`). ``None``: exactly the segments needed (one host sync to count them).
    """
    device = sorted_owner.device
    owner_ids = torch.arange(num_owners + 1, device=device, dtype=sorted_owner.dtype)
    bounds = torch.searchsorted(sorted_owner, owner_ids)  # each owner's range in the list
    starts = bounds[:-1]
    counts = bounds[1:] - starts
    segs = -(-counts // segment_len)
    seg_ends = torch.cumsum(segs, 0)
    if max_segments is None:
        max_segments = int(seg_ends[-1]) if num_owners else 0
    if not num_owners:
        empty = torch.zeros(max_segments, dtype=torch.int32, device=device)
        return empty, empty.clone(), empty.clone()
    seg = torch.arange(max_segments, device=device)
    seg_owner = torch.searchsorted(seg_ends, seg, right=True)  # num_owners for the unused tail
    used = seg_owner < num_owners
    seg_owner = seg_owner.clamp(max=num_owners - 1)
    seg_rank = seg - (seg_ends - segs)[seg_owner]
    seg_start = starts[seg_owner] + seg_rank * segment_len
    seg_end = torch.minimum(seg_start + segment_len, starts[seg_owner] + counts[seg_owner])
    return tuple(torch.where(used, t, 0).to(torch.int32) for t in (seg_owner, seg_start, seg_end))


def max_segments_for(num_items: int, num_owners: int, segment_len: int) -> int:
    """The most segments :func:`segment_owners` can need for ``num_items`` items: a full segment per
    ``segment_len`` items, plus one partial segment per owner holding any."""
    return num_items // segment_len + min(num_owners, num_items)


def tile_overhead(block_idx: torch.Tensor, tokens_per_tile: int) -> float:
    """Work done / work selected: blocks visited for all tokens of each tile over blocks they chose."""
    tiles = build_query_tiles(block_idx, tokens_per_tile)
    done = tiles.count.double().sum() * tokens_per_tile
    return float(done / (block_idx >= 0).sum().double())
