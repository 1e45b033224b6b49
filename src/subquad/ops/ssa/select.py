"""Routing: block summaries and the per-token choice of key blocks.

Every query token gets its own selection (``DESIGN.md``, "SSA semantics"): the sink blocks, the
``local_blocks`` blocks ending with its own block, and the ``top_k`` highest-scoring *earlier* blocks.
Routed candidates are only complete blocks strictly before the local window, so a summary never mixes
in a key later than the token: routing is causal by construction.

Three routers produce the routed part:

* ``flat``: scores the token's routing query against every candidate block summary, exact top-k.
  ``O(N / block_size)`` dot products per query: quadratic over a whole sequence.
* ``tree``: blocks are grouped ``G`` at a time; a group keeps the elementwise max and min of its
  block summaries, which bound ``q . s`` for every block in it from above (``sum_d max(q_d mx_d,
  q_d mn_d)``). A token scores the bound of every *complete, fully earlier* group, deals those groups
  into ``P`` interleaved stretches (group ``g`` into stretch ``g % P``) and expands the best group of
  each stretch, plus its own partially-filled group, block by block, and takes the top-k of those.
  ``N/(G b) + (P + 1) G`` dot products per query, ``O(sqrt(N))`` with ``G ~ sqrt(N / (b P))``.
  A group that holds blocks at or after the token's window is never summarised for it (no leak).
  The best group of each stretch rather than the ``P`` best overall: a decode step picks its groups
  without ranking them all (one kernel instead of a bounds kernel and a sort of every group's bound,
  ``triton_select.decode_tree_lists``), and neighbouring groups, which often hold related keys, land
  in different stretches.

* ``beam`` (causal only): a three-level tree, blocks under level-1 nodes of ``F`` blocks under level-2
  nodes of ``F`` level-1 nodes, each node bounded as the tree's groups are (elementwise max and min of
  its non-sink block summaries). A token scores every level-2 node that ends before its local window,
  keeps the ``W`` best, scores their children plus the complete level-1 nodes of the level-2 node its
  window starts in, keeps the ``W`` best, and scores the blocks of those plus the complete blocks of
  the level-1 node its window starts in, exactly, for the top-k. ``2 N/(F^2 b) + 3 (W + 1) F``
  summary-sized dot products per query (a bound counts two): linear in N with a ``1/F^2`` slope, the
  gathered rows constant. With ``W F`` at least the number of blocks it keeps every level-1 node and
  equals ``flat``, so ``route`` routes flat there. Only complete nodes before the window are bounded.

A block's score is its routing query against its summary: the block's mean key, or with
``summary="max"`` the best of the means of its sub-blocks (``block_scores``), so summaries are
``[B, ceil(S / config.summary_size), Hkv, D]`` in both cases.

Scores are computed for the *routing query* of a KV head: the sum of its group's query heads, so the
GQA heads of one KV head share a selection (``(sum_h q_h) . s == sum_h (q_h . s)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from subquad.ops.ssa.config import SSAConfig, _check_int

# Elements of the largest temporary a chunk may allocate (fp32: 1 GiB); bounds memory at any length.
# On the CPU 32 MiB: larger temporaries are fresh mmaps, page-faulted per chunk (the nano router at
# 64K: 1.8 s a layer with 2^28, 1.3 s with 2^23; benchmarks/NOTES.md item 38).
_CHUNK_ELEMENTS = 1 << 28
_CPU_CHUNK_ELEMENTS = 1 << 23


def _chunk_elements(device: torch.device) -> int:
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS


@dataclass
class SSASelection:
    """Per-token block selection.

    block_idx: ``[B, Hkv, T, K]`` int32 key-block indices, ``-1`` for unused slots; each valid entry
        of a row is distinct. Slots hold, in order, the sink blocks, the local blocks, the routed blocks.
    block_size: tokens per key block.
    num_fixed_slots: how many leading slots hold sink and local blocks (``None`` when unknown, e.g.
        a hand-made selection); the kernels treat the rest as routed blocks, which lets them process
        those key-major.
    fixed_layout: set by :func:`select_blocks`: ``(sink_blocks, local_blocks, causal)``, which with the
        shapes fixes those slots' content, so the kernels may reuse their work lists across calls
        (``None``: unknown; leave it ``None`` when changing the fixed slots by hand).
    """

    block_idx: torch.Tensor
    block_size: int
    num_fixed_slots: int | None = None
    fixed_layout: tuple | None = None

    def num_selected_keys(self, seq_len_k: int, causal: bool = False) -> torch.Tensor:
        """Keys in the selected blocks per (batch, kv head, token): ``[B, Hkv, T]`` int64.

        With ``causal``, only the keys at or before the token's position ``S - T + i`` count.
        """
        idx = self.block_idx.long()
        start = idx * self.block_size
        stop = (start + self.block_size).clamp(max=seq_len_k)
        if causal:
            seq_len_q = idx.shape[2]
            query_pos = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=idx.device).view(1, 1, -1, 1)
            stop = torch.minimum(stop, query_pos + 1)
        return torch.where(idx >= 0, (stop - start).clamp(min=0), 0).sum(-1)


def block_summaries(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each block.

    k: ``[B, S, Hkv, D]`` -> ``[B, ceil(S / block_size), Hkv, D]`` float32; the last block may be
    partial and is averaged over the keys it holds.
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"k: expected 4 dims [batch, seq, heads, head_dim], got {got}")
    _check_int("block_size", block_size, minimum=1)
    batch, seq_len, heads, dim = k.shape
    num_blocks = -(-seq_len // block_size)
    pad = num_blocks * block_size - seq_len
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
    # Summed in fp32 without an fp32 copy of the keys (2x their size at 1M tokens).
    sums = k.view(batch, num_blocks, block_size, heads, dim).sum(2, dtype=torch.float32)
    counts = torch.full((num_blocks,), float(block_size), device=k.device)
    counts[-1] = block_size - pad
    return sums / counts.view(1, -1, 1, 1)


def routing_summaries(k: torch.Tensor, config: SSAConfig) -> torch.Tensor:
    """The summaries ``config`` routes by: mean keys of every ``config.summary_size`` keys."""
    return block_summaries(k, config.summary_size)


def block_scores(scores: torch.Tensor, config: SSAConfig, num_blocks: int) -> torch.Tensor:
    """Scores of summaries ``[..., NS]`` -> scores of key blocks ``[..., num_blocks]``.

    ``"mean"`` has one summary per block; ``"max"`` takes the best of each block's sub-blocks (those a
    partial last block holds). Summaries past ``num_blocks`` blocks are ignored.
    """
    per_block = config.summaries_per_block
    if per_block == 1:
        return scores[..., :num_blocks]
    scores = scores[..., : num_blocks * per_block]
    pad = num_blocks * per_block - scores.shape[-1]
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    return scores.view(*scores.shape[:-1], num_blocks, per_block).amax(-1)


def routing_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum of each KV head's query heads: ``[B, T, Hq, D]`` -> ``[B, T, Hkv, D]`` float32."""
    batch, seq_len, heads, dim = q.shape
    return q.view(batch, seq_len, num_kv_heads, heads // num_kv_heads, dim).sum(3, dtype=torch.float32)


def query_blocks(seq_len_q: int, seq_len_k: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Key block holding each query token under bottom-right alignment: ``[T]`` int64."""
    positions = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=device)
    return positions // block_size


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SSAConfig,
    causal: bool = True,
    summaries: torch.Tensor | None = None,
) -> SSASelection:
    """Choose the key blocks of every query token.

    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; ``summaries`` (optional,
    ``[B, ceil(S / config.summary_size), Hkv, D]``) are precomputed routing summaries, e.g. kept up to
    date by a KV cache. Returns an :class:`SSASelection` with ``K = config.blocks_per_query`` slots.
    """
    from subquad.ops.ssa.interface import _check_config, _check_summaries, validate_qkv

    validate_qkv(q, k, k, causal=causal)
    config = _check_config(config)
    batch, seq_len_q, _, _ = q.shape
    seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
    block_size = config.block_size
    num_blocks = -(-seq_len_k // block_size)
    if summaries is None:
        summaries = routing_summaries(k, config)
    else:
        _check_summaries(summaries, k, config.summary_size)
    device = q.device
    qblock = query_blocks(seq_len_q, seq_len_k, block_size, device)

    # [T, sink + local]: sinks first (dropped where the local window already holds them), then local.
    sink = torch.arange(config.sink_blocks, device=device).expand(seq_len_q, -1)
    local = qblock[:, None] - torch.arange(config.local_blocks - 1, -1, -1, device=device)
    local = torch.where(local >= 0, local, -1)
    in_window = (sink >= qblock[:, None] - config.local_blocks + 1) & (sink <= qblock[:, None])
    valid_sink = (sink < num_blocks) & ~in_window
    if causal:
        valid_sink &= sink <= qblock[:, None]
    sink = torch.where(valid_sink, sink, -1)
    fixed = torch.cat([sink, local], dim=1).to(torch.int32)
    fixed = fixed.view(1, 1, seq_len_q, -1).expand(batch, num_kv_heads, -1, -1)

    layout = (config.sink_blocks, config.local_blocks, causal)
    if config.top_k == 0:
        return SSASelection(fixed.contiguous(), block_size, fixed.shape[-1], layout)
    if _routes_on_triton(q):
        from subquad.ops.ssa import triton_select

        # The Triton routers score in bf16: summed straight into it (a float32 copy would be 4 GB written
        # and read again at 1M tokens), in one pass over q.
        rq = triton_select.sum_query_heads(q, num_kv_heads, torch.bfloat16)
    else:
        rq = routing_queries(q, num_kv_heads)
    routed = route(rq, summaries, seq_len_k, config, causal)
    return SSASelection(torch.cat([fixed, routed], dim=-1).contiguous(), block_size, fixed.shape[-1], layout)


def route(
    rq: torch.Tensor, summaries: torch.Tensor, seq_len_k: int, config: SSAConfig, causal: bool
) -> torch.Tensor:
    """The routed part of a selection, ``[B, Hkv, T, top_k]`` int32 (-1 padded), by ``config.index``:
    Triton on CUDA (bf16 scores), the PyTorch references elsewhere (fp32). rq: ``[B, T, Hkv, D]``
    routing queries of the tokens at positions ``seq_len_k - T ..``; summaries ``[B, NS, Hkv, D]``."""
    index = config.index
    if index == "beam":
        beam_check_causal(causal)
        if beam_routes_flat(-(-seq_len_k // config.block_size), config):
            index = "flat"
    if _routes_on_triton(rq):
        from subquad.ops.ssa import triton_select

        router = {
            "flat": triton_select.route_flat_triton,
            "tree": triton_select.route_tree_triton,
            "beam": triton_select.route_beam_triton,
        }[index]
        return router(rq.bfloat16(), summaries.bfloat16().contiguous(), seq_len_k, config, causal)
    router = {"flat": _route_flat, "tree": _route_tree, "beam": _route_beam}[index]
    return router(rq, summaries.float(), seq_len_k, config, causal)


def routing_agreement(reference: SSASelection, other: SSASelection) -> float:
    """Share of ``reference``'s routed blocks that ``other`` routes too, for the same token and KV head.

    Both come from :func:`select_blocks` on the same inputs (say the flat router and the tree index);
    the sink and local slots, which every router takes, are left out. 1.0 when nothing is routed.
    """
    if reference.block_idx.shape[:3] != other.block_idx.shape[:3]:
        raise ValueError(
            f"selections of different inputs: [B, Hkv, T] {tuple(reference.block_idx.shape[:3])} vs "
            f"{tuple(other.block_idx.shape[:3])}"
        )
    if reference.num_fixed_slots is None or other.num_fixed_slots is None:
        raise ValueError("routing_agreement needs selections that know their fixed slots (select_blocks')")
    a = reference.block_idx[..., reference.num_fixed_slots :]
    b = other.block_idx[..., other.num_fixed_slots :]
    hits = routed = 0
    for start in range(0, a.shape[2], 4096):  # [.., T, K, K] comparisons a chunk of tokens at a time
        ac, bc = a[:, :, start : start + 4096, :, None], b[:, :, start : start + 4096, None, :]
        hits += int(((ac == bc) & (ac >= 0)).any(-1).sum())
        routed += int((ac >= 0).sum())
    return hits / routed if routed else 1.0


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _routes_on_triton(x: torch.Tensor) -> bool:
    """Whether :func:`route` runs the Triton routers for routing queries on ``x``'s device."""
    return x.is_cuda and _triton_available()


def is_candidate(
    blocks: torch.Tensor, qblock: torch.Tensor, config: SSAConfig, causal: bool, num_blocks: int
) -> torch.Tensor:
    """Which ``blocks`` (``[..., Tc, M]``) tokens in key blocks ``qblock`` (``[Tc]``) may route to.

    Candidates follow the sinks and lie outside the token's local window; with ``causal`` they also
    precede it, so they are complete blocks of keys strictly earlier than the token.
    """
    q_b = qblock[:, None]
    ok = (blocks >= config.sink_blocks) & (blocks < num_blocks)
    if causal:
        return ok & (blocks <= q_b - config.local_blocks)
    return ok & ((blocks > q_b) | (blocks <= q_b - config.local_blocks))


def _topk_blocks(scores: torch.Tensor, blocks: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Top-k of ``scores`` (masked entries are -inf) as int32 block ids, -1 where fewer exist."""
    width = scores.shape[-1]
    k_eff = min(top_k, width)
    values, order = scores.topk(k_eff, dim=-1)
    picked = order if blocks is None else blocks.gather(-1, order)
    # Masked entries are -inf (NaN fails the test too); one comparison, where isfinite takes four ops.
    picked = torch.where(values > float("-inf"), picked, -1).to(torch.int32)
    if k_eff < top_k:
        picked = torch.nn.functional.pad(picked, (0, top_k - k_eff), value=-1)
    return picked


def _query_chunks(seq_len_q: int, seq_len_k: int, per_token: int, device: torch.device):
    """(start, stop, position of the first token) for chunks holding ``_chunk_elements(device)``
    elements."""
    chunk = max(1, _chunk_elements(device) // max(1, per_token))
    for start in range(0, seq_len_q, chunk):
        yield start, min(seq_len_q, start + chunk), seq_len_k - seq_len_q + start


def _route_flat(rq, summaries, seq_len_k, config, causal):
    """Reference flat router: every candidate block scored, exact top-k. ``rq``: ``[B, T, Hkv, D]``."""
    batch, seq_len_q, heads, _ = rq.shape
    num_blocks = -(-seq_len_k // config.block_size)
    summ_t = summaries.permute(0, 2, 3, 1)  # [B, Hkv, D, NS]
    all_blocks = torch.arange(num_blocks, device=rq.device)
    per_block = config.summaries_per_block
    per_token = batch * heads * summaries.shape[1]
    if causal:  # chunks of at most 1/16 of the queries, so scoring only their earlier blocks halves the work
        per_token = max(per_token, _chunk_elements(rq.device) // max(1, -(-seq_len_q // 16)))
    out = []
    for start, stop, first_pos in _query_chunks(seq_len_q, seq_len_k, per_token, rq.device):
        width = num_blocks
        if causal:  # the chunk's last token routes to blocks before its local window, no later ones
            last_block = (first_pos + stop - start - 1) // config.block_size
            width = max(0, min(num_blocks, last_block - config.local_blocks + 1))
        scores = torch.matmul(rq[:, start:stop].transpose(1, 2), summ_t[..., : width * per_block])
        scores = block_scores(scores, config, width)  # [B, Hkv, Tc, width]
        qblock = torch.arange(first_pos, first_pos + stop - start, device=rq.device) // config.block_size
        ok = is_candidate(all_blocks[:width].expand(stop - start, -1), qblock, config, causal, num_blocks)
        scores.masked_fill_(~ok, float("-inf"))
        out.append(_topk_blocks(scores, None, config.top_k))
    return torch.cat(out, dim=2)


def tree_shape(num_blocks: int, config: SSAConfig) -> tuple[int, int]:
    """(blocks per group, groups probed) used by ``index="tree"`` for ``num_blocks`` key blocks."""
    # top_k == 0 routes nothing; probe one group so the shape (and cost) stay defined.
    probe = config.tree_probe or max(1, config.top_k)
    if config.tree_group is not None:
        return config.tree_group, probe
    group = 2 ** round(math.log2(max(2.0, math.sqrt(num_blocks / probe))))
    return max(2, group), probe


def tree_cost_per_query(num_blocks: int, config: SSAConfig) -> int:
    """Summary dot products one query pays with ``index="tree"`` (bounds count twice: max and min)."""
    group, probe = tree_shape(num_blocks, config)
    num_groups = -(-num_blocks // group)
    return 2 * num_groups + (min(probe, num_groups) + _own_group_slots(config, group)) * group


def _own_group_slots(config: SSAConfig, group: int) -> int:
    """Groups per token expanded block by block: the ones its local window (or its edge) touches."""
    return (config.local_blocks - 1) // group + 2


def tree_bounds(summaries: torch.Tensor, config: SSAConfig, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise max and min over each group's non-sink block summaries: ``[B, Hkv, NG, D]`` each.

    Groups holding only sink blocks get zeros (their bound is masked out by the caller).
    """
    summ = summaries.float().transpose(1, 2)  # [B, Hkv, NB, D]
    batch, heads, num_blocks, dim = summ.shape
    num_groups = -(-num_blocks // group)
    pad = num_groups * group - num_blocks
    block = torch.arange(num_groups * group, device=summ.device)
    excluded = ((block < config.sink_blocks) | (block >= num_blocks)).view(1, 1, num_groups, group, 1)
    padded = torch.nn.functional.pad(summ, (0, 0, 0, pad)).view(batch, heads, num_groups, group, dim)
    hi = padded.masked_fill(excluded, float("-inf")).amax(3)
    lo = padded.masked_fill(excluded, float("inf")).amin(3)
    empty = excluded.all(3)
    return hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)


def packed_keys(score: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``triton_select._pack_keys`` in PyTorch: int64 keys whose order is ``score``'s (the score's lowest
    bit dropped), then ``ids``'s; -1 where ``score`` is -inf."""
    bits = score.float().contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, ~bits, bits | (1 << 31)) & 0xFFFFFFFF
    return torch.where(score > float("-inf"), ((ordered >> 1) << 32) | ids, -1)


def best_of_stretches(bound: torch.Tensor, probe: int) -> torch.Tensor:
    """The group with the highest bound in each of ``probe`` interleaved stretches (stretch ``s``: the
    groups ``g`` with ``g % probe == s``, so a run of up to ``probe`` neighbouring groups has each in its
    own): ``[..., probe]`` int64, -1 for a stretch with no group to probe. ``bound [..., NG]``: -inf where
    a group may not be probed. Ties (and bounds within their lowest bit) go to the larger id, as the
    decode kernel's packed keys."""
    width = -(-bound.shape[-1] // probe) * probe
    bound = torch.nn.functional.pad(bound, (0, width - bound.shape[-1]), value=float("-inf"))
    keys = packed_keys(bound, torch.arange(width, device=bound.device))
    best = keys.view(*keys.shape[:-1], width // probe, probe).amax(-2)
    return torch.where(best >= 0, best & 0xFFFFFFFF, -1)


def tree_probe_groups(rq, bounds, num_blocks, first_pos, config, causal):
    """Groups a chunk of tokens expands: ``[B, Hkv, Tc, P + W]`` int32 (-1 = none).

    The best complete group by upper bound of each of ``P`` stretches of the groups a token may probe
    (:func:`best_of_stretches`), then the ``W`` groups touching the token's local window, which are
    expanded block by block: for a causal token their bound would mix in keys it may not see. rq:
    ``[B, Tc, Hkv, D]`` for tokens at positions ``first_pos + i``.
    """
    hi, lo = bounds
    num_groups = hi.shape[2]
    group, probe = tree_shape(num_blocks, config)
    probe = min(probe, num_groups)
    q = rq.transpose(1, 2).to(hi.dtype)  # [B, Hkv, Tc, D]
    bound = torch.matmul(q.clamp(min=0), hi.transpose(-1, -2)) + torch.matmul(
        q.clamp(max=0), lo.transpose(-1, -2)
    )
    bound = bound.float()
    seq = rq.shape[1]
    qblock = torch.arange(first_pos, first_pos + seq, device=rq.device) // config.block_size
    window_first = (qblock - config.local_blocks + 1).clamp(min=0) // group  # first group touching window
    window_last = qblock // group
    group_ids = torch.arange(num_groups, device=rq.device)
    blocked = (group_ids + 1) * group <= config.sink_blocks  # sink-only groups
    if causal:
        blocked = blocked | (group_ids >= window_first[:, None])
    else:
        blocked = blocked | ((group_ids >= window_first[:, None]) & (group_ids <= window_last[:, None]))
    bound.masked_fill_(blocked, float("-inf"))
    chosen = best_of_stretches(bound, probe)
    own = window_first[:, None] + torch.arange(_own_group_slots(config, group), device=rq.device)
    own = torch.where(own <= window_last[:, None], own, -1)
    own = own.view(1, 1, seq, -1).expand(rq.shape[0], hi.shape[1], -1, -1)
    return torch.cat([chosen, own], dim=-1).to(torch.int32)


def _route_tree(rq, summaries, seq_len_k, config, causal):
    """Reference tree router: probe groups by bound, then score their blocks (gathered) exactly."""
    batch, seq_len_q, heads, dim = rq.shape
    num_blocks = summaries.shape[1]
    group, probe = tree_shape(num_blocks, config)
    bounds = tree_bounds(summaries, config, group)
    width = (min(probe, bounds[0].shape[2]) + _own_group_slots(config, group)) * group
    per_token = batch * heads * (width * dim + 6 * bounds[0].shape[2])  # bounds, their int64 keys
    out = []
    for start, stop, first_pos in _query_chunks(seq_len_q, seq_len_k, per_token, rq.device):
        groups = tree_probe_groups(rq[:, start:stop], bounds, num_blocks, first_pos, config, causal)
        out.append(_rescore_groups(rq[:, start:stop], summaries, groups, first_pos, config, group, causal))
    return torch.cat(out, dim=2)


def _rescore_groups(rq, summaries, groups, first_pos, config, group, causal):
    """Reference of ``triton_select.rescore_topk``: the candidate blocks of the probed groups (``groups``
    ``[B, Hkv, Tc, P]``, -1 = none; group ``g`` holds blocks ``g * group ..``) scored exactly, top-k as
    ``[B, Hkv, Tc, top_k]`` int32. rq: ``[B, Tc, Hkv, D]`` for tokens at positions ``first_pos + i``."""
    num_blocks = summaries.shape[1]
    groups = groups.long()
    offsets = torch.arange(group, device=rq.device)
    blocks = (groups[..., None] * group + offsets).flatten(-2)  # [B, Hkv, Tc, M]
    qblock = torch.arange(first_pos, first_pos + rq.shape[1], device=rq.device) // config.block_size
    ok = (groups >= 0).repeat_interleave(group, dim=-1) & is_candidate(
        blocks, qblock, config, causal, num_blocks
    )
    scores = _gathered_scores(rq.transpose(1, 2), summaries, blocks.clamp(0, num_blocks - 1), ok)
    return _topk_blocks(scores, blocks, config.top_k)


# Children per node of ``index="beam"`` when ``tree_group`` is unset.
BEAM_FANOUT = 8


def beam_shape(config: SSAConfig) -> tuple[int, int]:
    """(children per node ``F``, nodes kept per level ``W``) of ``index="beam"``."""
    return config.tree_group or BEAM_FANOUT, config.tree_probe or max(1, config.top_k)


def beam_cost_per_query(num_blocks: int, config: SSAConfig) -> int:
    """Summary-sized dot products one query pays with ``index="beam"`` at most (a bound is two)."""
    fanout, width = beam_shape(config)
    level2 = -(-num_blocks // fanout**2)
    return 2 * level2 + 2 * (width + 1) * fanout + (width + 1) * fanout


def beam_routes_flat(num_blocks: int, config: SSAConfig) -> bool:
    """Whether ``index="beam"`` over ``num_blocks`` key blocks keeps every level-1 node (``W F`` at least
    the blocks): its picks are then flat's, and it is routed flat, at flat's cost."""
    fanout, width = beam_shape(config)
    return width * fanout >= num_blocks


def beam_node_bounds(
    summaries: torch.Tensor, config: SSAConfig, level: int, first: int, stop: int
) -> torch.Tensor:
    """Box bounds ``[hi, lo]`` of the beam index's level-``level`` nodes ``first .. stop - 1`` (a node
    covers ``F**level`` blocks): ``[B, stop - first, Hkv, 2D]`` float32 for summaries ``[B, NB, Hkv, D]``.

    A node bounds its non-sink blocks; nodes without any (sink-only, or padding past the last block) are
    zeros, and no token may probe them. ``[q+, q-] . [hi, lo]`` bounds ``q . s`` of every block in the
    node from above.
    """
    fanout, _ = beam_shape(config)
    span = fanout**level
    summ = summaries[:, first * span : stop * span].float()
    batch, count, heads, dim = summ.shape
    pad = (stop - first) * span - count
    block = torch.arange(first * span, stop * span, device=summ.device)
    excluded = ((block < config.sink_blocks) | (block >= first * span + count)).view(1, -1, 1, 1)
    summ = torch.nn.functional.pad(summ, (0, 0, 0, 0, 0, pad))
    hi = summ.masked_fill(excluded, float("-inf")).view(batch, -1, span, heads, dim).amax(2)
    lo = summ.masked_fill(excluded, float("inf")).view(batch, -1, span, heads, dim).amin(2)
    node = torch.cat([hi, lo], dim=-1)
    return node.masked_fill(~torch.isfinite(node), 0.0)


def beam_level_sizes(num_blocks: int, config: SSAConfig) -> tuple[int, int]:
    """Nodes of the beam index's level 1 and level 2 over ``num_blocks`` blocks (level 2 has at least one)."""
    fanout, _ = beam_shape(config)
    return -(-num_blocks // fanout), max(1, -(-num_blocks // fanout**2))


def beam_levels(summaries: torch.Tensor, config: SSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node's :func:`beam_node_bounds`: ``[B, NG1, Hkv, 2D]`` and ``[B, NG2, Hkv, 2D]`` float32 for
    summaries ``[B, NB, Hkv, D]``."""
    sizes = beam_level_sizes(summaries.shape[1], config)
    return tuple(beam_node_bounds(summaries, config, level, 0, n) for level, n in zip((1, 2), sizes))


def beam_check_causal(causal: bool) -> None:
    """The beam index bounds only nodes before a token's window: it routes causal attention only."""
    if not causal:
        raise ValueError(
            "causal=False: index='beam' routes causal attention only; use index='flat' or 'tree'"
        )


def beam_queries(rq: torch.Tensor) -> torch.Tensor:
    """``[q+, q-]``: routing queries ``[B, T, Hkv, D]`` as the features bounds are scored with."""
    return torch.cat([rq.clamp(min=0), rq.clamp(max=0)], dim=-1)


def _window_starts(first_pos: int, count: int, config: SSAConfig, device: torch.device) -> torch.Tensor:
    """First block of each token's local window, ``[count]`` int64: routed blocks lie before it."""
    qblock = torch.arange(first_pos, first_pos + count, device=device) // config.block_size
    return (qblock - config.local_blocks + 1).clamp(min=0)


def _route_beam(rq, summaries, seq_len_k, config, causal, levels=None):
    """Reference beam index (module docstring): two levels of bounds, then the blocks scored exactly.
    ``levels``: :func:`beam_levels` of ``summaries`` when the caller keeps them (a decode step's cache
    layer, :class:`triton_decode.BeamLevels`: only the nodes before the tokens' windows need be right)."""
    beam_check_causal(causal)
    batch, seq_len_q, heads, dim = rq.shape
    fanout, width = beam_shape(config)
    level1, level2 = beam_levels(summaries, config) if levels is None else levels
    children = torch.arange(fanout, device=rq.device)
    per_token = batch * heads * (level2.shape[1] + 2 * (width + 1) * fanout * 2 * dim)
    out = []
    for start, stop, first_pos in _query_chunks(seq_len_q, seq_len_k, per_token, rq.device):
        rq_c = rq[:, start:stop].transpose(1, 2)  # [B, Hkv, Tc, D]
        feats = beam_queries(rq_c)
        window = _window_starts(first_pos, stop - start, config, rq.device)  # [Tc]
        # Level 2: every complete node before the window (and not sink-only), by bound.
        nodes = torch.arange(level2.shape[1], device=rq.device)
        ok = (nodes >= config.sink_blocks // fanout**2) & (nodes < (window // fanout**2)[:, None])
        scores = torch.matmul(feats, level2.permute(0, 2, 3, 1)).masked_fill(~ok, float("-inf"))
        parents = _topk_blocks(scores, None, width).long()
        # Level 1: the kept nodes' children and the complete children of the node the window starts in.
        parents = torch.cat(
            [parents, (window // fanout**2).view(1, 1, -1, 1).expand(batch, heads, -1, 1)], -1
        )
        nodes = (parents[..., None] * fanout + children).flatten(-2)  # [B, Hkv, Tc, (W + 1) F]
        ok = (parents >= 0).repeat_interleave(fanout, dim=-1)
        ok &= (nodes >= config.sink_blocks // fanout) & (nodes < (window // fanout)[:, None])
        scores = _gathered_scores(feats, level1, nodes.clamp(0, level1.shape[1] - 1), ok)
        parents = _topk_blocks(scores, nodes, width).long()
        # Blocks: the kept level-1 nodes' and the complete ones of the node the window starts in.
        parents = torch.cat([parents, (window // fanout).view(1, 1, -1, 1).expand(batch, heads, -1, 1)], -1)
        out.append(_rescore_groups(rq[:, start:stop], summaries, parents, first_pos, config, fanout, causal))
    return torch.cat(out, dim=2)


def _gathered_scores(feats: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor):
    """``feats [B, Hkv, Tc, F] . table[ids]`` for rows ``ids [B, Hkv, Tc, M]`` of ``table [B, N, Hkv, F]``,
    -inf where not ``ok``."""
    batch, heads, seq, width = ids.shape
    rows = table.transpose(1, 2)  # [B, Hkv, N, F]
    index = ids.reshape(batch, heads, -1, 1).expand(-1, -1, -1, rows.shape[-1])
    gathered = rows.gather(2, index).view(batch, heads, seq, width, -1)
    scores = torch.einsum("bhtf,bhtmf->bhtm", feats, gathered)
    return scores.masked_fill(~ok, float("-inf"))
