"""SSA decoding: one new token per sequence against a KV cache, rows of different lengths.

Routing (``decode_select``) gives each row's token the same selection ``select_blocks`` gives the
last token of that row in a full forward: sink blocks, the local window, and the ``top_k`` best
complete earlier blocks scored against the cached block summaries. Attention then reads only those
blocks. Two attention paths with one signature:

* ``sparse_decode_naive``: plain PyTorch gather + softmax (any device; the reference).
* ``sparse_decode_triton``: a split-K Triton kernel. Program ``(b * Hkv + h, split)`` takes a few
  selection slots of one KV head, scores all of that head's query heads against each selected
  block (one ``tl.dot`` per block) with an online softmax, and writes a partial (max, sum, acc);
  a second kernel merges the splits. The work per token is ``K * block_size`` keys whatever the
  context length, so latency stays flat from 32K to 12M tokens.

Rows may hold different numbers of tokens (``seqlens``); keys at or after a row's length are never
read, so a cache stored right-padded serves a batch of prompts of different lengths.

A graphed model step (rows of one length) runs :func:`fused_decode_step` from the q/k/v projection's
output: the token's rotation and cache append run inside the router's first kernel, and the split-K
programs pick the selection from the router's candidate lists themselves (three kernels a layer for
either index, against six).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import (
    _own_group_slots,
    _route_beam,
    _route_tree,
    _topk_blocks,
    beam_level_sizes,
    beam_node_bounds,
    beam_routes_flat,
    beam_shape,
    best_of_stretches,
    block_scores,
    route,
    routing_queries,
    tree_bounds,
    tree_shape,
)

try:
    import triton
    import triton.language as tl

    from subquad.ops import fused, pdl
    from subquad.ops.ssa.triton_select import _merge_top, _pack_keys
except ImportError:  # pragma: no cover - triton is optional on CPU machines
    triton = None
    tl = None


@dataclass
class DecodePlan:
    """What routing a decode step needs that depends only on the rows' lengths, not on a layer.

    Every layer of a model holds the same lengths, so a model builds this once per step
    (:func:`decode_plan`) and each layer's :func:`decode_select` only scores its own summaries.

    * seqlens: ``[B]`` int32, tokens per row including the new one (on the device).
    * lengths: the same as Python ints (a cache keeps them, so reading them costs no sync); None when
      unknown and not needed.
    * num_blocks: ``ceil(max(lengths) / block_size)``.
    * fixed: ``[B, 1, sink + local]`` int32 sink and local block ids (``-1`` unused).
    * not_candidate: ``[B, 1, NB]`` bool, the blocks the flat router may not pick.
    * tree: the tree router's per-step state when every row holds the same length (None otherwise:
      rows route one by one).
    * blocks_key: what the tensors other than ``seqlens`` depend on (config, NB, each row's block): a
      later step whose rows are still in the same blocks reuses them.
    """

    seqlens: torch.Tensor
    lengths: tuple[int, ...] | None
    num_blocks: int
    fixed: torch.Tensor
    not_candidate: torch.Tensor | None = None
    tree: _TreeStep | None = None
    blocks_key: tuple | None = None


@dataclass
class _TreeStep:
    """``index="tree"`` for rows of one length: the group layout and masks of ``_route_tree`` for the
    newest token (see ``select.tree_bounds`` / ``tree_probe_groups``), computed once per step."""

    group: int
    probe: int  # groups expanded, at most the number of groups
    excluded: torch.Tensor  # [1, 1, NG, G, 1] bool: sink blocks and padding, left out of the bounds
    empty: torch.Tensor | None  # [1, 1, NG, 1] bool: groups of sink blocks only (None: there are none)
    blocked: torch.Tensor  # [NG] bool: groups the token may not probe (sink-only, window or later)
    own: torch.Tensor  # [W] int64: the groups touching the window, expanded block by block (-1: none)
    offsets: torch.Tensor  # [G] int64: 0 .. group - 1
    last_candidate: int  # the last block the token may route to (``qblock - local_blocks``)
    window_first: int  # the first group touching the window: groups before it are the probe-able ones


def decode_plan(
    seqlens: torch.Tensor,
    num_blocks: int,
    config: SSAConfig,
    lengths: list[int] | tuple[int, ...] | None = None,
    previous: DecodePlan | None = None,
) -> DecodePlan:
    """The per-step part of :func:`decode_select` for rows holding ``seqlens`` tokens (new one included).

    ``lengths``: ``seqlens`` as Python ints when the caller knows them (a cache does); otherwise they
    are read from the device (a sync), which only the tree router needs. ``previous``: the last step's
    plan, whose tensors are reused when every row's token sits in the same block as then.
    """
    device = seqlens.device
    batch = seqlens.shape[0]
    bs = config.block_size
    seqlens = seqlens.to(torch.int32)
    if lengths is None and config.index != "flat" and config.top_k:
        lengths = seqlens.tolist()  # tree and beam route by each row's length: host values
    blocks_key = None
    if lengths is not None:
        lengths = tuple(int(n) for n in lengths)
        blocks_key = (config, num_blocks, tuple((n - 1) // bs for n in lengths), device)
        if previous is not None and previous.blocks_key == blocks_key:
            return replace(previous, seqlens=seqlens, lengths=lengths)
    qblock = (seqlens.long() - 1) // bs  # [B]

    sink = torch.arange(config.sink_blocks, device=device).expand(batch, -1)
    local = qblock[:, None] - torch.arange(config.local_blocks - 1, -1, -1, device=device)
    local = torch.where(local >= 0, local, -1)
    in_window = sink >= qblock[:, None] - config.local_blocks + 1
    sink = torch.where((sink <= qblock[:, None]) & ~in_window, sink, -1)
    fixed = torch.cat([sink, local], dim=1).to(torch.int32)[:, None]
    plan = DecodePlan(seqlens, lengths, num_blocks, fixed, blocks_key=blocks_key)
    if config.top_k == 0 or num_blocks == 0:
        return plan
    if config.index == "flat":
        blocks = torch.arange(num_blocks, device=device)
        ok = (blocks >= config.sink_blocks) & (blocks[None, :] <= (qblock - config.local_blocks)[:, None])
        plan.not_candidate = ~ok[:, None, :]
    elif config.index == "tree" and len(set(lengths)) == 1 and -(-lengths[0] // bs) == num_blocks:
        plan.tree = _tree_step(lengths[0], config, device)
    return plan


def _tree_step(length: int, config: SSAConfig, device: torch.device) -> _TreeStep:
    """``_route_tree``'s data-independent part for the token at position ``length - 1``."""
    bs = config.block_size
    num_blocks = -(-length // bs)
    group, probe = tree_shape(num_blocks, config)
    num_groups = -(-num_blocks // group)
    block = torch.arange(num_groups * group, device=device)
    excluded = ((block < config.sink_blocks) | (block >= num_blocks)).view(1, 1, num_groups, group, 1)
    empty = excluded.all(3) if config.sink_blocks >= group else None
    qblock = (length - 1) // bs
    window_first = max(qblock - config.local_blocks + 1, 0) // group
    window_last = qblock // group
    group_ids = torch.arange(num_groups, device=device)
    blocked = ((group_ids + 1) * group <= config.sink_blocks) | (group_ids >= window_first)
    own = window_first + torch.arange(_own_group_slots(config, group), device=device)
    own = own.masked_fill(own > window_last, -1)
    return _TreeStep(
        group=group,
        probe=min(probe, num_groups),
        excluded=excluded,
        empty=empty,
        blocked=blocked,
        own=own,
        offsets=torch.arange(group, device=device),
        last_candidate=qblock - config.local_blocks,
        window_first=window_first,
    )


class TreeBounds:
    """The tree router's group bounds (``select.tree_bounds``) of one cache layer, kept across steps.

    A decode step may probe only groups that end before its local window; their blocks are complete, so
    their summaries, and bounds, never change while tokens are appended. A step therefore bounds only
    the groups that became probe-able since the last one (usually none) instead of every group: no
    per-step work or memory traffic that grows with the context. Keep one per cache layer in
    ``SSACacheLayer.derived``, which the cache clears when stored tokens change other than by appending.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.hi: torch.Tensor | None = None  # [B, Hkv, capacity, D] float32
        self.lo: torch.Tensor | None = None
        self.done = 0  # groups bounded so far

    def bounds(
        self, summ: torch.Tensor, step: _TreeStep, config: SSAConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hi, lo)``, ``[B, Hkv, NG, D]`` each, for ``summ [B, Hkv, NB, D]`` float32: equal to
        ``tree_bounds`` for the groups before the token's window, zeros for the rest (blocked)."""
        batch, heads, num_blocks, dim = summ.shape
        group = step.group
        num_groups = -(-num_blocks // group)
        key = (group, config.sink_blocks, batch, heads, dim, summ.device)
        if key != self.key:
            self.key, self.hi, self.lo, self.done = key, None, None, 0
        if self.hi is None or num_groups > self.hi.shape[2]:
            capacity = max(64, 2 * num_groups)
            hi = summ.new_zeros(batch, heads, capacity, dim)
            lo = summ.new_zeros(batch, heads, capacity, dim)
            if self.hi is not None:
                hi[:, :, : self.done] = self.hi[:, :, : self.done]
                lo[:, :, : self.done] = self.lo[:, :, : self.done]
            self.hi, self.lo = hi, lo
        first, stop = self.done, step.window_first
        if first < stop:
            blocks = summ[:, :, first * group : stop * group].reshape(batch, heads, stop - first, group, dim)
            excluded = step.excluded[:, :, first:stop]
            self.hi[:, :, first:stop] = blocks.masked_fill(excluded, float("-inf")).amax(3)
            self.lo[:, :, first:stop] = blocks.masked_fill(excluded, float("inf")).amin(3)
            if step.empty is not None:
                empty = step.empty[:, :, first:stop]
                self.hi[:, :, first:stop].masked_fill_(empty, 0.0)
                self.lo[:, :, first:stop].masked_fill_(empty, 0.0)
            self.done = stop
        return self.hi[:, :, :num_groups], self.lo[:, :, :num_groups]


class BeamLevels:
    """The beam index's node bounds (``select.beam_levels``) of one cache layer, kept across steps.

    A token may probe only nodes that end before its local window; their blocks are complete, so their
    bounds never change while tokens are appended. A step therefore bounds only the level-1 nodes (every
    ``F`` blocks) and level-2 nodes (every ``F**2``) that became probe-able since the last one, instead
    of rebuilding both levels from every block's summary. Keep one per cache layer in
    ``SSACacheLayer.derived`` (:func:`kept_index`), which the cache clears when stored tokens change other
    than by appending.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tables: list[torch.Tensor | None] = [None, None]  # level 1, level 2: [B, capacity, Hkv, 2D]
        self.done = [0, 0]  # nodes bounded so far, per level

    def levels(
        self, summaries: torch.Tensor, length: int, config: SSAConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``beam_levels(summaries, config)`` for the nodes before the window of the token at position
        ``length - 1``, zeros for the later ones (which it may not probe). ``summaries``: ``[B, NB, Hkv,
        D]`` of ``length`` tokens a row."""
        batch, num_blocks, heads, dim = summaries.shape
        fanout, _ = beam_shape(config)
        key = (fanout, config.sink_blocks, batch, heads, dim, summaries.device)
        if key != self.key:
            self.key, self.tables, self.done = key, [None, None], [0, 0]
        window = max((length - 1) // config.block_size - config.local_blocks + 1, 0)
        out = []
        for level, nodes in enumerate(beam_level_sizes(num_blocks, config)):
            table = self.tables[level]
            if table is None or nodes > table.shape[1]:
                grown = summaries.new_zeros(batch, max(64, 2 * nodes), heads, 2 * dim, dtype=torch.float32)
                if table is not None:
                    grown[:, : self.done[level]] = table[:, : self.done[level]]
                self.tables[level] = table = grown
            first, stop = self.done[level], min(nodes, window // fanout ** (level + 1))
            if first < stop:
                table[:, first:stop] = beam_node_bounds(summaries, config, level + 1, first, stop)
                self.done[level] = stop
            out.append(table[:, :nodes])
        return out[0], out[1]


def kept_index(derived: dict, config: SSAConfig) -> TreeBounds | BeamLevels | None:
    """The routing index state a cache layer keeps across decode steps for ``config.index``, from its
    ``derived`` dict (created on first use): :class:`TreeBounds` or :class:`BeamLevels`; ``None`` for flat,
    which keeps none."""
    if config.index == "tree":
        return derived.setdefault("tree_bounds", TreeBounds())
    if config.index == "beam":
        return derived.setdefault("beam_levels", BeamLevels())
    return None


def decode_select(
    q: torch.Tensor,
    summaries: torch.Tensor,
    seqlens: torch.Tensor,
    config: SSAConfig,
    plan: DecodePlan | None = None,
    kept: TreeBounds | BeamLevels | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Selection of each row's newest token: ``[B, Hkv, K]`` int32 block ids, ``-1`` for empty slots.

    q: ``[B, Hq, D]`` (the token at position ``seqlens[b] - 1`` of row ``b``); summaries:
    ``[B, NS, Hkv, D]`` routing summaries (``config.summary_size`` keys each; blocks past a row's
    length are ignored); seqlens: ``[B]``
    tokens per row including the new one. Same selection as ``select_blocks`` for that token.
    ``plan``: :func:`decode_plan` of these ``seqlens`` and ``NB``, when the caller shares it across
    layers (built here otherwise). ``kept``: the routing index state of the cache layer that holds
    ``summaries`` (:func:`kept_index`: the tree's group bounds, the beam's node bounds), kept across
    steps. ``backend="triton"`` (CUDA) routes a tree step of rows of one length with two Triton
    kernels (``triton_select.decode_route_tree``) instead of ~25 PyTorch ops; same picks up to
    floating-point summation order.
    """
    num_kv_heads = summaries.shape[2]
    if plan is None:
        plan = decode_plan(seqlens, -(-summaries.shape[1] // config.summaries_per_block), config)
    fixed = plan.fixed.expand(-1, num_kv_heads, -1)
    if config.top_k == 0 or plan.num_blocks == 0:
        return fixed.contiguous()

    if config.index == "tree" and plan.tree is not None and backend == "triton":
        from subquad.ops.ssa.triton_select import decode_route_tree

        hi, lo = tree_step_bounds(summaries, plan.tree, config, kept)
        return decode_route_tree(q, summaries, hi, lo, plan.fixed, plan.tree, config)
    rq = routing_queries(q[:, None], num_kv_heads)[:, 0]  # [B, Hkv, D] fp32
    if config.index == "beam":
        bs = config.block_size
        length = plan.lengths[0]
        if (
            kept is not None
            and len(set(plan.lengths)) == 1
            and not beam_routes_flat(-(-length // bs), config)
        ):
            # The reference's arithmetic on the kept node bounds: float32 on every device, as flat's
            # decode scores are (a full forward on CUDA routes in bf16: picks agree up to rounding).
            summ = summaries[:, : -(-length // bs)].float()
            levels = kept.levels(summ, length, config)
            routed = _route_beam(rq[:, None], summ, length, config, True, levels)[:, :, 0]
        else:
            # Each row as a full forward over it routes its last token (bounds built from scratch).
            rows = [
                route(rq[b, None, None], summaries[b : b + 1, : -(-n // bs)], n, config, True)
                for b, n in enumerate(plan.lengths)
            ]
            routed = torch.cat(rows, dim=0)[:, :, 0]
        return torch.cat([fixed, routed], dim=-1)
    if config.index == "tree":
        if plan.tree is not None:
            routed = _route_tree_step(rq, summaries.float(), plan.tree, config, kept)
        else:
            # The tree's grouping depends on each row's own block count: route row by row, exactly as
            # a full forward over that row would.
            bs = config.block_size
            rows = [
                _route_tree(rq[b, None, None], summaries[b : b + 1, : -(-n // bs)].float(), n, config, True)
                for b, n in enumerate(plan.lengths)
            ]
            routed = torch.cat(rows, dim=0)[:, :, 0]
        return torch.cat([fixed, routed], dim=-1)
    summ = summaries.transpose(1, 2)  # [B, Hkv, NS, D]
    scores = torch.matmul(summ, rq.to(summ.dtype)[..., None])[..., 0].float()  # [B, Hkv, NS]
    scores = block_scores(scores, config, plan.num_blocks)  # [B, Hkv, NB]
    scores.masked_fill_(plan.not_candidate, float("-inf"))
    routed = _topk_blocks(scores, None, config.top_k)
    return torch.cat([fixed, routed], dim=-1)


def tree_step_bounds(
    summaries: torch.Tensor, step: _TreeStep, config: SSAConfig, kept: TreeBounds | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group bounds ``[B, Hkv, NG, D]`` float32 of ``summaries [B, NB, Hkv, D]``: the cache layer's kept
    ones when given (valid before the token's window), else computed from scratch."""
    if kept is not None:
        return kept.bounds(summaries.float().transpose(1, 2), step, config)
    return tree_bounds(summaries, config, step.group)


def _route_tree_step(
    rq: torch.Tensor,
    summaries: torch.Tensor,
    step: _TreeStep,
    config: SSAConfig,
    kept: TreeBounds | None = None,
) -> torch.Tensor:
    """``_route_tree`` for one token per row, rows of one length, the step's masks precomputed: the same
    arithmetic, so the same picks. rq ``[B, Hkv, D]``; summaries ``[B, NB, Hkv, D]`` float32; ``kept``:
    the cache layer's bounds (computed from scratch without). Returns ``[B, Hkv, top_k]`` int32."""
    group = step.group
    summ = summaries.transpose(1, 2)  # [B, Hkv, NB, D]
    batch, heads, num_blocks, dim = summ.shape
    hi, lo = tree_step_bounds(summaries, step, config, kept)
    # Groups to expand (select.tree_probe_groups).
    q = rq[:, :, None]  # [B, Hkv, 1, D]
    bound = torch.matmul(q.clamp(min=0), hi.transpose(-1, -2)) + torch.matmul(
        q.clamp(max=0), lo.transpose(-1, -2)
    )
    bound.masked_fill_(step.blocked, float("-inf"))
    chosen = best_of_stretches(bound, step.probe)
    groups = torch.cat([chosen, step.own.expand(batch, heads, 1, -1)], dim=-1)  # [B, Hkv, 1, P + W]
    blocks = (groups[..., None] * group + step.offsets).flatten(-2)
    # A group id of -1 gives negative block ids, so one range test also drops "no group".
    not_candidate = (blocks < config.sink_blocks) | (blocks > step.last_candidate)
    gather_idx = blocks.clamp(0, num_blocks - 1).flatten(2)[..., None].expand(-1, -1, -1, dim)
    gathered = summ.gather(2, gather_idx).view(batch, heads, 1, -1, dim)
    scores = torch.einsum("bhtd,bhtmd->bhtm", q, gathered)
    scores.masked_fill_(not_candidate, float("-inf"))
    return _topk_blocks(scores, blocks, config.top_k)[:, :, 0]


def sparse_decode_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    seqlens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one token per row over its selected blocks, in plain PyTorch.

    q: ``[B, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; block_idx: ``[B, Hkv, K]`` int32
    (``-1`` unused); seqlens: ``[B]`` valid keys per row (the query sits at ``seqlens[b] - 1``).
    Returns ``[B, Hq, Dv]`` in ``q.dtype``, accumulated in float32.
    """
    batch, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = dim**-0.5 if scale is None else scale
    idx = block_idx.long()
    key_pos = (idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
    lens = seqlens.to(device=q.device, dtype=torch.long).view(batch, 1, 1)
    valid = (idx >= 0).repeat_interleave(block_size, dim=-1) & (key_pos < lens) & (key_pos < seq_len_k)
    gather_pos = key_pos.clamp(0, seq_len_k - 1)  # [B, Hkv, K * bs]
    kh = k.transpose(1, 2)  # [B, Hkv, S, D] (a view: only the gathered rows are read)
    vh = v.transpose(1, 2)
    kg = kh.gather(2, gather_pos[..., None].expand(-1, -1, -1, dim)).float()
    vg = vh.gather(2, gather_pos[..., None].expand(-1, -1, -1, vh.shape[-1])).float()
    qh = q.float().view(batch, heads_kv, group, dim)
    scores = torch.matmul(qh, kg.transpose(-1, -2)) * scale  # [B, Hkv, G, K * bs]
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, vg)  # [B, Hkv, G, Dv]
    return out.reshape(batch, heads_q, -1).to(q.dtype)


if triton is not None:
    # Context-moving ints not specialised on, as triton_select's decode kernels.
    @triton.jit(do_not_specialize=["num_splits", "seq_len_k", "num_lists"])
    def _sparse_decode_split_kernel(
        Q, K, V, IDX, LENS, M_OUT, L_OUT, ACC_OUT, PART, FIXED,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ib, stride_ih, stride_ik, stride_fb,
        num_kv_heads, num_slots, num_splits, seq_len_k, scale, num_lists,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
        SLOTS_PER_SPLIT: tl.constexpr, PICK: tl.constexpr, NUM_FIXED: tl.constexpr, FIXED_PAD: tl.constexpr,
        LISTS_PAD: tl.constexpr, K_PAD: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # Program (row x KV head, split): slots SLOTS_PER_SPLIT * split.. of the selection IDX [B, Hkv, K],
        # or with PICK, of the selection it picks itself and writes to IDX (split 0): the sink and local
        # slots FIXED [B, 1, NUM_FIXED], then the best of the candidate lists PART [B * Hkv, num_lists,
        # K_PAD] (packed keys, triton_select._pack_keys). Every split picks the same: a kernel fewer than
        # picking in its own launch, for one top-k of the lists a program.
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        h = (pid_bh % num_kv_heads).to(tl.int64)
        if PICK:  # the host writes FIXED before the step: loaded before the PDL wait
            fcols = tl.arange(0, FIXED_PAD)
            fixed = tl.load(FIXED + b * stride_fb + fcols, mask=fcols < NUM_FIXED, other=-1)
        pdl.wait(PDL)
        seqlen = tl.minimum(tl.load(LENS + b).to(tl.int64), seq_len_k)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_SIZE)
        g_mask = offs_g < GROUP
        heads = h * GROUP + offs_g
        q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BG, BD]
        idx_row = IDX + b * stride_ib + h * stride_ih
        if PICK:
            lists = tl.arange(0, LISTS_PAD)
            cols = tl.arange(0, K_PAD)
            keys = tl.load(
                PART + (pid_bh.to(tl.int64) * num_lists + lists[:, None]) * K_PAD + cols[None, :],
                mask=(lists < num_lists)[:, None],
                other=-1,
            )
            keys = tl.reshape(keys, [1, LISTS_PAD * K_PAD])
            if LISTS_PAD > 1:
                keys = tl.topk(keys, K_PAD)
            top = tl.sort(keys, descending=True)
            picked = tl.where(top >= 0, (top & 0xFFFFFFFF).to(tl.int32), -1)  # [1, K_PAD]
            routed = cols[None, :] + NUM_FIXED  # the slot each pick fills
            if split == 0:
                tl.store(idx_row + fcols * stride_ik, fixed, mask=fcols < NUM_FIXED)
                tl.store(idx_row + routed * stride_ik, picked, mask=routed < num_slots)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        for s in range(SLOTS_PER_SPLIT):
            slot = split * SLOTS_PER_SPLIT + s
            if PICK:  # the slot's block from registers (+1 / -1: a slot matched by neither gives -1)
                blk = tl.sum(tl.where(fcols == slot, fixed + 1, 0))
                blk += tl.sum(tl.where(routed == slot, picked + 1, 0))
                blk = tl.where(slot < num_slots, blk - 1, -1)
            else:
                blk = tl.load(idx_row + slot * stride_ik, mask=slot < num_slots, other=-1)
            if blk >= 0:
                pos = blk.to(tl.int64) * BLOCK_SIZE + offs_n  # [BN]
                k_mask = pos < seqlen
                k_ptrs = (
                    K + b * stride_kb + pos[:, None] * stride_ks + h * stride_kh + offs_d[None, :] * stride_kd
                )
                v_rows = V + b * stride_vb + pos * stride_vs + h * stride_vh
                # V's rows asked of L2 before K's load: the sm_90 code issues V's load only once K has
                # arrived and gone through shared memory for the dot, a second trip to HBM on the chain.
                fused.prefetch_l2(v_rows, k_mask, PREFETCH)
                k = tl.load(
                    k_ptrs, mask=k_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0
                )  # [BN, BD]
                scores = tl.dot(q, tl.trans(k)) * scale  # [BG, BN] fp32
                scores = tl.where(k_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                # A block with no visible key keeps m at -inf: shift by 0 so exp() stays finite.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(scores - m_safe[:, None])
                v_ptrs = v_rows[:, None] + offs_dv[None, :] * stride_vd
                v = tl.load(v_ptrs, mask=k_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

        row = (pid_bh.to(tl.int64) * num_splits + split) * BLOCK_G
        tl.store(M_OUT + row + offs_g, m_i)
        tl.store(L_OUT + row + offs_g, l_i)
        tl.store(ACC_OUT + (row + offs_g[:, None]) * BLOCK_DV + offs_dv[None, :], acc)

    @triton.jit
    def _sparse_decode_merge_kernel(
        M_IN, L_IN, ACC_IN, OUT,
        stride_ob, stride_oh, stride_od,
        num_kv_heads,
        NUM_SPLITS: tl.constexpr, SPLITS_CHUNK: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # One program per query head, the splits' partials loaded SPLITS_CHUNK at a time (one chunk for
        # up to 32 splits): a loop over single splits made the merge a chain of dependent loads, ~7 us
        # for 19 splits on an H200.
        pdl.wait(PDL)
        pid_bh = tl.program_id(0)
        g = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        h = (pid_bh % num_kv_heads).to(tl.int64)
        offs_dv = tl.arange(0, BLOCK_DV)
        m_run = tl.full([1], float("-inf"), dtype=tl.float32)
        l_run = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for first in tl.static_range(0, NUM_SPLITS, SPLITS_CHUNK):
            splits = first + tl.arange(0, SPLITS_CHUNK)
            rows = (pid_bh.to(tl.int64) * NUM_SPLITS + splits) * BLOCK_G + g
            real = splits < NUM_SPLITS
            m = tl.load(M_IN + rows, mask=real, other=float("-inf"))
            m_new = tl.maximum(m_run, tl.max(m, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: weights stay 0
            keep = tl.exp(m_run - shift)
            w = tl.exp(m - shift)
            l_run = l_run * keep + tl.sum(w * tl.load(L_IN + rows, mask=real, other=0.0), 0)
            part = ACC_IN + rows[:, None] * BLOCK_DV + offs_dv[None, :]
            acc = acc * keep + tl.sum(w[:, None] * tl.load(part, mask=real[:, None], other=0.0), 0)
            m_run = m_new
        # A row that saw no key (cannot happen for a valid selection) writes zeros, as the reference does.
        out = acc / tl.where(l_run == 0.0, 1.0, l_run)
        o_ptrs = OUT + b * stride_ob + (h * GROUP + g) * stride_oh + offs_dv * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)

    @triton.jit
    def _flat_tile_keys(
        rq, summ, blocks, last_candidate, SINK: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr
    ):
        """The best ``K_PAD`` candidates of a tile of summaries ``[TILE, BLOCK_D]`` as packed keys ``[1,
        K_PAD]``: blocks after the sinks, up to ``last_candidate`` (the flat router's), scored by ``rq``."""
        score = tl.sum(rq[None, :] * summ, 1)
        ok = (blocks >= SINK) & (blocks <= last_candidate)
        keys = _pack_keys(score, blocks, ok)[None, :]
        if TILE > K_PAD:
            keys = tl.topk(keys, K_PAD)
        return keys

    @triton.jit(do_not_specialize=["num_blocks", "num_splits", "tiles_per_split"])
    def _flat_route_append_kernel(
        QKV, COS, SIN, Q_OUT, KEY_BUF, VALUE_BUF, MEANS, POS, PART,
        s_x_b, s_x_h, s_kb_b, s_kb_s, s_kb_h, s_vb_b, s_vb_s, s_vb_h, s_m_b, s_m_n, s_m_h,
        HKV, num_blocks, num_splits, tiles_per_split,
        GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
        K_PAD: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # Program (row x KV head, split). Split num_splits rotates the new token's q and k heads and appends
        # it to the cache (fused.rotate_append_decode_token). The others route: each scores the summaries of
        # tiles_per_split tiles of TILE blocks with the routing query (the sum of the rotated query heads,
        # rounded as the heads the reference routes with) and writes its best K_PAD candidates as packed
        # keys into PART [B * Hkv, num_splits, K_PAD]. The first tile is loaded before the PDL wait: the
        # summaries of candidate blocks (complete, before the window) are written by no kernel of the step.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // HKV).to(tl.int64)
        h = (bh % HKV).to(tl.int64)
        if split == num_splits:
            fused._rotate_append_program(
                QKV,
                COS,
                SIN,
                Q_OUT,
                KEY_BUF,
                VALUE_BUF,
                MEANS,
                POS,
                b,
                h,
                HKV,
                s_x_b,
                s_x_h,
                s_kb_b,
                s_kb_s,
                s_kb_h,
                s_vb_b,
                s_vb_s,
                s_vb_h,
                s_m_b,
                s_m_n,
                s_m_h,
                GROUP,
                D,
                BS,
                BLOCK_G,
                BLOCK_S,
                BLOCK_D,
                PDL,
            )
        else:
            d = tl.arange(0, BLOCK_D)
            d_ok = d < D
            summ_base = MEANS + b * s_m_b + h * s_m_h + d[None, :]
            first = split.to(tl.int64) * tiles_per_split * TILE
            blocks = first + tl.arange(0, TILE)
            summ = tl.load(
                summ_base + blocks[:, None] * s_m_n,
                mask=(blocks < num_blocks)[:, None] & d_ok[None, :],
                other=0.0,
            )
            # Loaded before the wait as in fused._rotate_append_program (see there).
            pos, block, cos, sin = fused._token_tables(POS, COS, SIN, d, d_ok, D, BS)
            last_candidate = block - LOCAL
            pdl.wait(PDL)
            g = tl.arange(0, BLOCK_G)[:, None]
            q = fused._rotated_heads(
                QKV + b * s_x_b + (h * GROUP + g) * s_x_h, cos, sin, d, (g < GROUP) & d_ok[None, :], D
            )
            rq = tl.sum(q.to(QKV.dtype.element_ty).to(tl.float32), axis=0)  # select.routing_queries
            best = _flat_tile_keys(rq, summ, blocks, last_candidate, SINK, K_PAD, TILE)
            for t in range(1, tiles_per_split):
                blocks = first + t * TILE + tl.arange(0, TILE)
                summ = tl.load(
                    summ_base + blocks[:, None] * s_m_n,
                    mask=(blocks < num_blocks)[:, None] & d_ok[None, :],
                    other=0.0,
                )
                keys = _flat_tile_keys(rq, summ, blocks, last_candidate, SINK, K_PAD, TILE)
                best = _merge_top(best, keys, 1, K_PAD)
            cols = tl.arange(0, K_PAD)
            tl.store(PART + (bh.to(tl.int64) * num_splits + split) * K_PAD + cols[None, :], best)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def sparse_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    seqlens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    slots_per_split: int | None = None,
) -> torch.Tensor:
    """Split-K Triton version of :func:`sparse_decode_naive` (same arguments; fp16/bf16).

    ``slots_per_split`` selection slots per program (default: enough programs to fill the GPU).
    ``k``/``v`` may be strided views (e.g. a cache buffer longer than the used length).
    """
    if triton is None:
        raise ValueError("sparse_decode_triton: triton is not installed (pip install 'subquad[triton]')")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _split_merge(q, k, v, block_idx.to(torch.int32), seqlens, block_size, scale, slots_per_split)


@dataclass
class _Pick:
    """The split kernel's ``PICK`` mode: candidate lists ``part [B * Hkv, num_lists, k_pad]`` (packed keys,
    ``triton_select._pack_keys``) and the sink and local slots ``fixed [B, 1, F]`` int32, from which it
    writes the selection itself."""

    part: torch.Tensor
    num_lists: int
    k_pad: int
    fixed: torch.Tensor


def _split_merge(q, k, v, block_idx, seqlens, block_size, scale, slots_per_split=None, pick=None):
    """Launch the split-K kernel and its merge: ``[B, Hq, Dv]``. ``block_idx [B, Hkv, K]`` int32 is read, or
    written with ``pick`` (:class:`_Pick`)."""
    batch, heads_q, dim = q.shape
    heads_kv, dim_v = k.shape[2], v.shape[-1]
    group = heads_q // heads_kv
    num_slots = block_idx.shape[-1]
    if slots_per_split is None:
        # About 256 programs: enough to cover the SMs of an H200 at batch 1 without tiny splits.
        slots_per_split = max(1, min(num_slots, -(-num_slots * batch * heads_kv // 256)))
    num_splits = max(1, -(-num_slots // slots_per_split))
    block_g = max(16, _next_pow2(group))
    block_d, block_dv = max(16, _next_pow2(dim)), max(16, _next_pow2(dim_v))
    seqlens = seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    m_part = torch.empty(batch * heads_kv * num_splits * block_g, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(m_part.numel() * block_dv, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, heads_q, dim_v, device=q.device, dtype=q.dtype)
    picking = pick is not None
    if not picking:  # PICK's arguments unused: block_idx in the tensors' places, sizes 1
        pick = _Pick(block_idx, 1, 1, block_idx)
    num_fixed = pick.fixed.shape[-1] if picking else 1
    _sparse_decode_split_kernel[(batch * heads_kv, num_splits)](
        q, k, v, block_idx, seqlens, m_part, l_part, acc_part, pick.part, pick.fixed,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), pick.fixed.stride(0),
        heads_kv, num_slots, num_splits, k.shape[1], scale, pick.num_lists,
        GROUP=group, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_D=block_d,
        HEAD_DIM_V=dim_v, BLOCK_DV=block_dv, SLOTS_PER_SPLIT=slots_per_split, PICK=picking,
        NUM_FIXED=num_fixed, FIXED_PAD=max(2, _next_pow2(num_fixed)), LISTS_PAD=_next_pow2(pick.num_lists),
        K_PAD=pick.k_pad, PREFETCH=fused.inline_ptx(q.device), **pdl.launch_args(q.device),
    )  # fmt: skip
    _sparse_decode_merge_kernel[(batch * heads_kv, group)](
        m_part, l_part, acc_part, out,
        out.stride(0), out.stride(1), out.stride(2),
        heads_kv,
        NUM_SPLITS=num_splits, SPLITS_CHUNK=min(32, max(2, _next_pow2(num_splits))),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM_V=dim_v, BLOCK_DV=block_dv, **pdl.launch_args(q.device),
    )  # fmt: skip
    return out


def ssa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SSAConfig | None = None,
    seqlens: torch.Tensor | None = None,
    summaries: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode one token per row with selective sparse attention.

    q: ``[B, 1, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (e.g. a KV cache, the new
    token's key and value already appended). Row ``b`` holds ``seqlens[b]`` valid tokens (default
    ``S`` for every row) and its query sits at position ``seqlens[b] - 1``. ``summaries``:
    ``[B, >= ceil(max(seqlens) / config.summary_size), Hkv, D]`` routing summaries (a cache's);
    computed from ``k`` when omitted. ``backend``: ``"torch"``, ``"triton"`` (CUDA fp16/bf16) or ``"auto"``.

    Returns ``[B, 1, Hq, Dv]``; with ``return_selection`` also the ``[B, Hkv, K]`` block ids. With
    ``seqlens`` all equal to ``S`` this equals ``ssa_attention(q, k, v, config)``.
    """
    from subquad.ops.ssa.interface import _check_config, _check_scale, resolve_backend, validate_qkv
    from subquad.ops.ssa.select import routing_summaries

    validate_qkv(q, k, v, causal=True)
    if q.shape[1] != 1:
        raise ValueError(f"q: shape {tuple(q.shape)}, expected one token per row [B, 1, Hq, D]")
    config = _check_config(config)
    scale = _check_scale(scale, q.shape[-1])
    batch, seq_len_k = k.shape[0], k.shape[1]
    lengths = None
    if seqlens is None:
        seqlens = torch.full((batch,), seq_len_k, device=q.device, dtype=torch.int32)
        lengths = [seq_len_k] * batch
    elif not isinstance(seqlens, torch.Tensor) or seqlens.shape != (batch,):
        got = tuple(seqlens.shape) if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__
        raise ValueError(f"seqlens: got {got}, expected a tensor of shape ({batch},)")
    seqlens = seqlens.to(q.device)
    if summaries is None:
        summaries = routing_summaries(k, config)
    else:
        need = -(-seq_len_k // config.summary_size)
        if (
            summaries.dim() != 4
            or summaries.shape[0] != batch
            or summaries.shape[1] < need
            or summaries.shape[2:] != k.shape[2:]
        ):
            raise ValueError(
                f"summaries: shape {tuple(summaries.shape)}, expected [{batch}, >= {need}, {k.shape[2]}, "
                f"{k.shape[3]}] (a summary per {config.summary_size} keys)"
            )
        summaries = summaries[:, :need]
    backend = resolve_backend(backend, q, v)
    plan = decode_plan(seqlens, -(-seq_len_k // config.block_size), config, lengths)
    out, block_idx = decode_step(q, k, v, summaries, plan, config, scale, backend)
    return (out, block_idx) if return_selection else out


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    summaries: torch.Tensor,
    plan: DecodePlan,
    config: SSAConfig,
    scale: float,
    backend: str,
    kept: TreeBounds | BeamLevels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssa_decode` without its checks, for callers that built the inputs themselves (a model's
    decode step, once per layer): ``(out [B, 1, Hq, Dv], block_idx [B, Hkv, K])``. ``summaries`` hold
    ``plan.num_blocks`` blocks' summaries; ``backend`` is ``"torch"`` or ``"triton"``; ``kept`` as in
    :func:`decode_select`."""
    q1 = q[:, 0]
    with torch.no_grad():
        block_idx = decode_select(q1, summaries, plan.seqlens, config, plan, kept, backend)
    if backend == "triton":
        out = sparse_decode_triton(q1, k, v, block_idx, plan.seqlens, config.block_size, scale)
    else:
        out = sparse_decode_naive(q1, k, v, block_idx, plan.seqlens, config.block_size, scale)
    return out[:, None], block_idx


# The fused flat step's routing (fused_decode_step): at most this many candidate lists per (row, KV head),
# each the best K_PAD of its blocks; every split-K program picks from all of them (64 x 16 = 1,024 keys).
_FLAT_MAX_LISTS = 64
# Summary elements (float32) of one routing tile, held in registers from before the PDL wait.
_FLAT_TILE_ELEMENTS = 16384


def fused_decode_step(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    means: torch.Tensor,
    plan: DecodePlan,
    config: SSAConfig,
    scale: float,
    backend: str,
    kept: TreeBounds | BeamLevels | None = None,
    route_lists: int | None = None,
    route_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's attention from its q/k/v projection: rotary embedding, cache append, routing and
    sparse attention of one new token per row, every row at position ``pos``.

    ``qkv``, ``cos``, ``sin``, ``pos`` and the cache's ``key_buf``, ``value_buf``, ``means`` as
    :func:`fused.rotate_append_decode_token_reference`; ``plan`` (for ``pos + 1`` tokens a row), ``config``,
    ``scale``, ``backend``, ``kept`` as :func:`decode_step`, which this equals over the cache's first
    ``plan.num_blocks`` blocks after the append: ``(out [B, 1, Hq, Dv], block_idx [B, Hkv, K])``.

    With ``backend="triton"``, the append runs inside the router's first kernel and the split-K
    attention picks the selection from the router's candidate lists itself (``_Pick``). Flat index (mean
    summaries), three kernels: :func:`_flat_route_append_kernel` (the append, and the candidate blocks
    scored tile by tile into lists of each split's best), the split-K attention, its merge. Tree index
    (rows of one length), three: ``triton_select.decode_tree_lists`` (bounds and candidate blocks, with the
    append), the split-K attention, its merge. Otherwise the append, then :func:`decode_step`.
    ``route_lists`` (the flat router's lists per row and KV head at most; default: enough to fill the
    GPU) and ``route_tile`` (blocks a flat routing program scores at once, a power of two) are for tuning
    and tests.
    """
    num_blocks = plan.num_blocks
    keys = num_blocks * config.block_size
    fused_path = _fused_path(plan, config, backend)
    if fused_path is None:
        if backend == "triton":
            q = fused.rotate_append_decode_token_triton(qkv, cos, sin, pos, key_buf, value_buf, means)
        else:
            q = fused.rotate_append_decode_token_reference(qkv, cos, sin, pos, key_buf, value_buf, means)
        k, v, summaries = key_buf[:, :keys], value_buf[:, :keys], means[:, :num_blocks]
        return decode_step(q, k, v, summaries, plan, config, scale, backend, kept)

    block_size = config.block_size
    if cos.dim() != 2 or cos.shape[0] != block_size:
        raise ValueError(f"cos: shape {tuple(cos.shape)}, expected {block_size} rows (a key block's tables)")
    heads_q = fused.check_rotate_append(qkv, cos, sin, pos, key_buf, value_buf, means)
    batch, _, heads_kv, dim = key_buf.shape
    q = torch.empty(batch, 1, heads_q, dim, dtype=qkv.dtype, device=qkv.device)
    append = (cos, sin, pos, q, key_buf, value_buf, means)
    if fused_path == "tree":
        from subquad.ops.ssa.triton_select import decode_tree_lists

        summaries = means[:, :num_blocks]
        hi, lo = tree_step_bounds(summaries, plan.tree, config, kept)
        if kept is not None:  # the kept buffers whole, rows past the window included: the kernel
            hi, lo = kept.hi, kept.lo  # takes the window from pos, in any later block
        part, lists, k_pad = decode_tree_lists(qkv, summaries, hi, lo, plan.tree, config, append)
    else:
        part, lists, k_pad = _flat_lists(qkv, append, num_blocks, config, route_lists, route_tile)
    block_idx = torch.empty(batch, heads_kv, plan.fixed.shape[-1] + config.top_k, dtype=torch.int32,
                            device=qkv.device)  # fmt: skip
    # The whole buffers: the lengths bound the keys read, and the launch stays valid in later key blocks.
    out = _split_merge(q[:, 0], key_buf, value_buf, block_idx, plan.seqlens, block_size, scale,
                       pick=_Pick(part, lists, k_pad, plan.fixed))  # fmt: skip
    return out[:, None], block_idx


def _fused_path(plan: DecodePlan, config: SSAConfig, backend: str) -> str | None:
    """Which fused step :func:`fused_decode_step` runs: ``"tree"``, ``"flat"`` or None (the append, then
    :func:`decode_step`)."""
    if backend != "triton" or config.top_k == 0 or plan.num_blocks == 0:
        return None
    if config.index == "tree" and plan.tree is not None:
        return "tree"
    if config.index == "flat" and config.summaries_per_block == 1:
        return "flat"
    return None


def fused_step_layout(plan: DecodePlan, config: SSAConfig, backend: str) -> tuple | None:
    """What the launches of :func:`fused_decode_step` depend on besides the tensors' memory when that is
    not the token's key block, or None when their arguments move with it.

    The fused tree step derives the token's window and block count from ``pos`` on the device
    (``triton_select.tree_lists_layout``) and its attention reads the whole cache buffers bounded by the
    plan's ``seqlens``; the sink and local slots come from ``plan.fixed``. So a step recorded in one key
    block replays in a later one with the same layout, as long as ``plan.fixed`` is a buffer the caller
    rewrites for each block (with the new plan's values) and the kept tree bounds are brought up to each
    block (``tree_step_bounds``) before the replay. The flat step's launch depends on the block count."""
    if _fused_path(plan, config, backend) != "tree":
        return None
    from subquad.ops.ssa.triton_select import tree_lists_layout

    return ("tree", *tree_lists_layout(plan.tree))


def _flat_lists(qkv, append, num_blocks, config, route_lists, route_tile) -> tuple[torch.Tensor, int, int]:
    """The flat router's candidate lists and the token's append, one kernel (:func:`fused_decode_step`):
    ``(part [B * Hkv, lists, k_pad] packed keys, lists, k_pad)``."""
    cos, sin, pos, q, key_buf, value_buf, means = append
    batch, _, heads_kv, dim = key_buf.shape
    heads_q, block_size = q.shape[2], config.block_size
    k_pad = max(16, _next_pow2(config.top_k))
    block_d = _next_pow2(dim)
    if route_tile is None:
        route_tile = max(k_pad, _FLAT_TILE_ELEMENTS // block_d)
    elif route_tile < k_pad or route_tile & (route_tile - 1):
        raise ValueError(f"route_tile={route_tile!r}: expected a power of two >= {k_pad} (a list's length)")
    if route_lists is None:
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 4
        route_lists = max(1, min(_FLAT_MAX_LISTS, sms // (batch * heads_kv)))
    elif route_lists < 1:
        raise ValueError(f"route_lists={route_lists!r}: expected a positive int")
    tiles = -(-num_blocks // route_tile)
    tiles_per_split = -(-tiles // min(route_lists, tiles))
    num_splits = -(-tiles // tiles_per_split)  # every split scores at least one tile
    group = heads_q // heads_kv
    part = torch.empty(batch * heads_kv * num_splits * k_pad, dtype=torch.int64, device=qkv.device)
    _flat_route_append_kernel[(batch * heads_kv, num_splits + 1)](
        qkv, cos, sin, q, key_buf, value_buf, means, pos, part,
        qkv.stride(0), qkv.stride(2),
        key_buf.stride(0), key_buf.stride(1), key_buf.stride(2),
        value_buf.stride(0), value_buf.stride(1), value_buf.stride(2),
        means.stride(0), means.stride(1), means.stride(2),
        heads_kv, num_blocks, num_splits, tiles_per_split,
        GROUP=group, D=dim, BS=block_size, SINK=config.sink_blocks, LOCAL=config.local_blocks,
        BLOCK_G=_next_pow2(group), BLOCK_S=_next_pow2(block_size), BLOCK_D=block_d, TILE=route_tile,
        K_PAD=k_pad, num_warps=max(4, min(16, route_tile * block_d // 2048)),  # ~64 summary floats a thread
        enable_fp_fusion=False,  # the rotation rounded as PyTorch rounds it (fused._rotated_heads)
        **pdl.launch_args(qkv.device),
    )  # fmt: skip
    return part, num_splits, k_pad
