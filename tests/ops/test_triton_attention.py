"""Triton sparse-attention kernels against the PyTorch reference.

On machines without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py before Triton is imported) on tiny shapes; fp16 there, since the interpreter
mishandles bf16 storage. On a GPU the same tests run bf16 and fp16 natively. ``poison_empty``
(tests/conftest.py) NaN-fills every ``torch.empty`` so a block the kernel never writes fails.
"""

import pytest
import torch

import subquad
from subquad.ops.ssa.naive import sparse_attention_naive
from subquad.ops.ssa.tiles import build_query_tiles, invert_tiles, tile_overhead

triton_attention = pytest.importorskip("subquad.ops.ssa.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]

# (B, T, S, Hq, Hkv, D, block_size, top_k, causal)
CASES = [
    (1, 63, 63, 4, 1, 64, 16, 1, True),
    (2, 45, 77, 8, 2, 32, 16, 2, True),
    (1, 40, 40, 8, 1, 128, 16, 1, True),
    (1, 33, 33, 3, 1, 40, 16, 1, True),
    (1, 50, 50, 2, 2, 16, 16, 1, False),
    (1, 1, 90, 4, 2, 32, 16, 1, True),
]


def _case_id(case):
    b, t, s, hq, hkv, d, bs, top_k, causal = case
    return f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-bs{bs}-k{top_k}-{'causal' if causal else 'full'}"


def _inputs(case, dtype):
    b, t, s, hq, hkv, d, _, _, _ = case
    q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype)
    return q, k, v


def _masked_attention_lowp(q, k, v, block_idx, block_size, causal, scale):
    """The same attention done by PyTorch in the inputs' low precision (the tolerance yardstick)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    mask = torch.zeros(b, hkv, t, -(-s // block_size) * block_size, dtype=torch.bool, device=q.device)
    idx = block_idx.long()
    for slot in range(idx.shape[-1]):
        pos = idx[..., slot, None] * block_size + torch.arange(block_size, device=q.device)
        ok = (idx[..., slot, None] >= 0).expand_as(pos)
        mask.scatter_(-1, pos.clamp(min=0), ok | mask.gather(-1, pos.clamp(min=0)))
    mask = mask[..., :s]
    if causal:
        qpos = torch.arange(s - t, s, device=q.device)
        mask &= torch.arange(s, device=q.device) <= qpos[:, None]
    mask = mask.repeat_interleave(hq // hkv, dim=1)
    kh = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    scores = (q.transpose(1, 2) @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores.float(), -1).to(q.dtype) @ vh).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_reference(case, dtype, poison_empty):
    torch.manual_seed(hash(_case_id(case)) % 2**31)
    q, k, v = _inputs(case, dtype)
    *_, block_size, top_k, causal = case
    config = subquad.SSAConfig(block_size=block_size, top_k=top_k)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, sel = subquad.ssa_attention(
        q, k, v, config=config, causal=causal, backend="triton", return_selection=True
    )
    scale = q.shape[-1] ** -0.5
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = sparse_attention_naive(*ref_inputs, sel.block_idx, block_size, causal, scale)
    with torch.no_grad():
        lowp = _masked_attention_lowp(q, k, v, sel.block_idx, block_size, causal, scale)
    assert not out.isnan().any()
    err = (out.float() - ref).abs().max().item()
    lowp_err = (lowp.float() - ref).abs().max().item()
    assert err <= 2 * lowp_err + 1e-3, (err, lowp_err)

    grad_out = torch.randn_like(ref)
    (out.float() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (t.grad for t in ref_inputs)):
        assert not got.isnan().any(), name
        # fp16 gradients: 3x flash-attn's rule, measured against the output's own low-precision error.
        tol = 3 * max(lowp_err, 1e-3) * max(1.0, want.abs().max().item())
        assert (got.float() - want).abs().max().item() <= tol, name


def test_full_budget_triton_equals_dense(poison_empty):
    torch.manual_seed(0)
    q, k, v = _inputs((1, 70, 70, 4, 2, 32, 16, 8, True), torch.float16)
    out = subquad.ssa_attention(q, k, v, config=subquad.SSAConfig(block_size=16, top_k=8), backend="triton")
    ref = subquad.dense_attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max().item() < 5e-3


def test_query_tiles_are_exact_unions(host_reads):
    torch.manual_seed(1)
    q = torch.randn(2, 90, 4, 16)
    k = torch.randn(2, 90, 2, 16)
    sel = subquad.select_blocks(q, k, subquad.SSAConfig(block_size=16, top_k=2))
    with host_reads() as reads:  # built without waiting for the device (every prefill layer does this)
        tiles = build_query_tiles(sel.block_idx, tokens_per_tile=8)
    assert reads.calls == []
    # Past each tile's count: no block, no token.
    past = torch.arange(tiles.blocks.shape[-1]) >= tiles.count[..., None]
    assert past.any() and (tiles.blocks[past] == -1).all() and (tiles.masks[past] == 0).all()
    idx = sel.block_idx.reshape(4, 90, -1)
    for bh in range(4):
        for tile in range(tiles.count.shape[1]):
            want = {}
            for t in range(8):
                if tile * 8 + t < 90:
                    for blk in idx[bh, tile * 8 + t].tolist():
                        if blk >= 0:
                            want[blk] = want.get(blk, 0) | (1 << t)
            n = int(tiles.count[bh, tile])
            got = dict(zip(tiles.blocks[bh, tile, :n].tolist(), tiles.masks[bh, tile, :n].tolist()))
            assert got == want
            assert tiles.blocks[bh, tile, :n].tolist() == sorted(want)
    # Key-major work lists hold each (tile, block) pair exactly once, in short segments.
    work = invert_tiles(tiles, num_blocks=6, max_tiles_per_segment=3)
    pairs = []
    for blk, start, end in zip(work.seg_block.tolist(), work.seg_start.tolist(), work.seg_end.tolist()):
        assert 0 < end - start <= 3
        pairs += [(blk // 6, blk % 6, int(work.tiles[p]), int(work.masks[p])) for p in range(start, end)]
    want_pairs = [
        (bh, int(tiles.blocks[bh, t, u]), t, int(tiles.masks[bh, t, u]))
        for bh in range(4)
        for t in range(tiles.count.shape[1])
        for u in range(int(tiles.count[bh, t]))
    ]
    assert sorted(pairs) == sorted(want_pairs)


def test_tile_overhead_bounds():
    torch.manual_seed(2)
    q = torch.randn(1, 256, 1, 16)
    k = torch.randn(1, 256, 1, 16)
    sel = subquad.select_blocks(q, k, subquad.SSAConfig(block_size=16, top_k=3))
    assert tile_overhead(sel.block_idx, 1) == pytest.approx(1.0)
    # A tile of 16 random queries visits more blocks than any one token chose, at most 16x as many.
    assert 1.0 < tile_overhead(sel.block_idx, 16) <= 16.0


@pytest.fixture(autouse=True)
def _small_threshold_tiles(monkeypatch):
    """The interpreter is slow on the threshold router's GPU tiles: 16 tokens x 32-block chunks."""
    if DEVICE == "cpu":
        from subquad.ops.ssa import triton_select

        monkeypatch.setattr(triton_select, "_THRESHOLD_BLOCK_M", 16)
        monkeypatch.setattr(triton_select, "_THRESHOLD_BLOCK_N", 32)


MAX4 = {"summary": "max", "sub_block_size": 4}


@pytest.mark.parametrize(
    "index,causal,extra",
    [
        ("flat", True, {}),
        ("flat", False, {}),
        ("flat", True, {"threshold": False}),  # group top-k in registers + rescore
        ("flat", True, {"top_k": 20, "threshold": False}),  # group maxima + torch.topk + scores + topk
        ("tree", True, {"tree_group": 2}),
        ("tree", True, {"top_k": 20, "tree_group": 2}),  # probed scores + torch.topk
        ("tree", False, {"tree_group": 4}),
        ("beam", True, {"tree_group": 2}),  # every node kept: flat's picks
        ("beam", True, {"tree_group": 2, "tree_probe": 2, "seq_len_k": 700}),  # pruned
        ("beam", True, {"top_k": 20, "tree_group": 4, "sink_blocks": 5, "seq_len_k": 1500}),  # wide lists
        ("flat", True, MAX4),
        ("flat", False, MAX4),  # the partial last block lacks sub-blocks
        ("flat", True, {**MAX4, "threshold": False}),
        ("flat", False, {**MAX4, "top_k": 20, "threshold": False}),
    ],
    ids=[
        "flat-causal",
        "flat-full",
        "flat-causal-groups",
        "flat-causal-k20-groups",
        "tree-causal",
        "tree-causal-k20",
        "tree-full",
        "beam-causal",
        "beam-causal-pruned",
        "beam-causal-k20",
        "max-causal",
        "max-full",
        "max-causal-groups",
        "max-full-k20-groups",
    ],
)
def test_triton_routing_matches_reference(index, causal, extra):
    from subquad.ops.ssa import select, triton_select

    torch.manual_seed(3)
    extra = dict(extra)
    route = {"threshold": extra.pop("threshold")} if "threshold" in extra else {}
    seq_len_q, seq_len_k = 40, extra.pop("seq_len_k", 150)
    config = subquad.SSAConfig(block_size=16, index=index, **{"top_k": 3, **extra})
    rq = torch.randn(1, seq_len_q, 2, 16, device=DEVICE)
    summaries = select.routing_summaries(torch.randn(1, seq_len_k, 2, 16, device=DEVICE), config)
    reference = {"flat": select._route_flat, "tree": select._route_tree, "beam": select._route_beam}[index]
    router = {
        "flat": triton_select.route_flat_triton,
        "tree": triton_select.route_tree_triton,
        "beam": triton_select.route_beam_triton,
    }[index]
    want = reference(rq, summaries, seq_len_k, config, causal)
    got = router(rq, summaries, seq_len_k, config, causal, **route)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_threshold_route_is_taken_where_it_measured_faster():
    from subquad.ops.ssa import triton_select

    def summaries(blocks, dim=128):
        return torch.empty(1, blocks, 8, dim, dtype=torch.bfloat16, device="meta")

    default, big_budget = subquad.SSAConfig(), subquad.SSAConfig(top_k=64)
    assert triton_select.threshold_pays(summaries(16384), default)  # layer-8b at 1M: 4 MB a KV head
    assert triton_select.threshold_pays(summaries(196608, dim=64), default)  # small at 12M: 25 MB
    assert not triton_select.threshold_pays(summaries(196608), default)  # long at 12M: 50 MB
    assert not triton_select.threshold_pays(summaries(1024), big_budget)
    max4 = subquad.SSAConfig(summary="max", sub_block_size=4)
    assert triton_select.threshold_pays(summaries(3145728, dim=64), max4)  # nano max4 at 12M: 384 MB
    max4_big_budget = subquad.SSAConfig(top_k=64, summary="max", sub_block_size=4)
    assert not triton_select.threshold_pays(summaries(1024), max4_big_budget)


def _picked_scores(rq, summaries, picked):
    """Routing scores of picked blocks ``[B, Hkv, T, K]`` (-inf for empty slots), sorted descending."""
    scores = torch.einsum("bthd,bnhd->bhtn", rq.float(), summaries.float())
    got = scores.gather(-1, picked.long().clamp(min=0))
    return got.masked_fill(picked < 0, float("-inf")).sort(-1, descending=True).values


@pytest.mark.parametrize(
    "top_k,causal,repeated,seq_len_q",
    [
        (3, True, False, 40),
        (20, True, False, 40),
        (5, False, False, 40),
        (4, True, True, 40),
        (5, True, False, None),
    ],
    ids=["k3-causal", "k20-causal", "k5-full", "k4-repeated-blocks", "k5-from-the-first-token"],
)
def test_threshold_topk_is_exact(top_k, causal, repeated, seq_len_q):
    """The two-pass threshold router over several chunks of blocks picks blocks whose scores are
    exactly the reference's top-k, with ties (repeated block summaries: every candidate ties, more
    of them than a list holds). Early tokens (fewer candidates than top_k) pick all their candidates
    and nothing else."""
    from subquad.ops.ssa import select, triton_select

    torch.manual_seed(11)
    config = subquad.SSAConfig(block_size=16, top_k=top_k)
    num_blocks = 200 if DEVICE == "cpu" else 330  # the late tokens' interiors: two chunks of 64 or more
    if seq_len_q is None:  # every token: a short sequence, the interpreter is slow
        num_blocks = 12
    seq_len_k = num_blocks * 16 - 5
    seq_len_q = seq_len_q or seq_len_k
    rq = torch.randn(1, seq_len_q, 2, 16, device=DEVICE)
    summaries = torch.randn(1, num_blocks, 2, 16, device=DEVICE)
    if repeated:  # every block the same: every candidate ties, late tokens have more of them than CAP
        summaries[:] = summaries[:, :1].clone()
    want = select._route_flat(rq, summaries, seq_len_k, config, causal)
    got = triton_select.threshold_topk(rq, summaries, seq_len_k - seq_len_q, config, causal)
    assert _picked_scores(rq, summaries, got).equal(_picked_scores(rq, summaries, want))
    valid = got.sort(-1).values  # the blocks of a list are distinct
    assert not ((valid[..., 1:] == valid[..., :-1]) & (valid[..., 1:] >= 0)).any()
    if not repeated:  # no ties: the very same blocks, best first
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert torch.equal(got, triton_select.route_flat_triton(rq, summaries, seq_len_k, config, causal))


@pytest.mark.parametrize("tiles_per_launch", [1, 2])
def test_threshold_topk_in_groups_of_tiles(monkeypatch, tiles_per_launch):
    """The lists of a full pass 1 take ``_THRESHOLD_LIST_BYTES``, so longer inputs launch a group of tiles
    at a time: groups of one tile, and of two with a shorter last one, pick the reference's blocks."""
    from subquad.ops.ssa import select, triton_select

    torch.manual_seed(13)
    config = subquad.SSAConfig(block_size=16, top_k=5)
    constants, _, _ = triton_select._threshold_launch(16, config, 1, True, True)
    tile_bytes = 2 * constants["BLOCK_M"] * constants["CAP"] * 8  # two KV heads
    monkeypatch.setattr(triton_select, "_THRESHOLD_LIST_BYTES", tiles_per_launch * tile_bytes)
    num_blocks = 100
    seq_len_k = num_blocks * 16 - 5
    seq_len_q = 5 * constants["BLOCK_M"] - 3  # five tiles, the last partial
    rq = torch.randn(1, seq_len_q, 2, 16, device=DEVICE)
    summaries = torch.randn(1, num_blocks, 2, 16, device=DEVICE)
    want = select._route_flat(rq, summaries, seq_len_k, config, True)
    got = triton_select.threshold_topk(rq, summaries, seq_len_k - seq_len_q, config, True)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "dtype,out_dtype,group,transposed",
    [
        (torch.bfloat16, torch.bfloat16, 4, False),
        (torch.float16, torch.bfloat16, 2, True),
        (torch.float32, torch.float32, 8, False),
        (torch.bfloat16, torch.bfloat16, 1, False),
    ],
    ids=["bf16-g4", "fp16-g2-transposed", "fp32-g8", "bf16-g1"],
)
def test_sum_query_heads_matches_routing_queries(dtype, out_dtype, group, transposed):
    """The Triton head sum is ``select.routing_queries`` (float32) rounded to its dtype, bit for bit: rows
    past a program's 32 (a batch of two, odd lengths, head dim 24), q whose head dim is not its last stride,
    each input dtype. Values in eighths keep every sum exact, so the order of the additions cannot
    differ."""
    from subquad.ops.ssa import select, triton_select

    torch.manual_seed(23)
    heads_kv, dim = 3, 24
    q = (torch.randint(-64, 65, (2, 11, dim, heads_kv * group), device=DEVICE) / 8).to(dtype)
    q = q.transpose(2, 3) if transposed else q.transpose(2, 3).contiguous()  # [B, T, Hq, D]
    got = triton_select.sum_query_heads(q, heads_kv, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, select.routing_queries(q, heads_kv).to(out_dtype))


@pytest.mark.parametrize(
    "dim,per_block,capped", [(64, 1, True), (128, 1, True), (256, 1, False), (128, 4, False)]
)
def test_threshold_launch_caps_registers_only_where_two_programs_fit(dim, per_block, capped):
    """One summary a block takes 8 warps, and the register cap where rows are up to 128 wide (80 KB of
    shared memory a program, two an SM); the beam's 256-wide level-2 rows take 160 KB, one program an SM,
    and spilled under a cap. Sub-block summaries take 4 warps, uncapped."""
    from subquad.ops.ssa import triton_select

    _, options, _ = triton_select._threshold_launch(dim, subquad.SSAConfig(), per_block, True, False)
    assert options["maxnreg"] == (triton_select._THRESHOLD_MAX_REGISTERS if capped else None)
    want_warps = (
        triton_select._THRESHOLD_NUM_WARPS if per_block == 1 else triton_select._THRESHOLD_SUBS_NUM_WARPS
    )
    assert options["num_warps"] == want_warps


@pytest.mark.parametrize("sample", [2, 3])
@pytest.mark.parametrize("subs", [1, 4])
def test_sampled_threshold_is_exact_when_the_best_blocks_are_not_sampled(monkeypatch, sample, subs):
    """Pass 1 scoring every ``sample``-th middle chunk: the best blocks all lie in chunks it skips, so
    its threshold is low and every block of that chunk passes, 2-4 times what a list holds; the lists
    keep the best, so the picks are still the reference's top-k, best first. Random queries as well."""
    from subquad.ops.ssa import select, triton_select

    monkeypatch.setattr(triton_select, "_THRESHOLD_CAP_PER_K", 1)  # lists of K_PAD = 16
    monkeypatch.setattr(triton_select, "_THRESHOLD_SAMPLE", (sample, sample))
    torch.manual_seed(5)
    extra = {} if subs == 1 else {"summary": "max", "sub_block_size": 16 // subs}
    config = subquad.SSAConfig(block_size=16, top_k=10, **extra)
    width = triton_select._THRESHOLD_BLOCK_N
    num_blocks = 4 * width + 9
    seq_len = num_blocks * 16 - 7
    rq = torch.zeros(1, 24, 2, 16, device=DEVICE)
    rq[..., 0] = 1.0 + torch.rand(1, 24, 2, device=DEVICE)  # every score is its summary's first component
    keys = torch.randn(1, seq_len, 2, 16, device=DEVICE)
    summaries = select.routing_summaries(keys, config)
    block = torch.arange(summaries.shape[1], device=DEVICE) // subs
    skipped = (block >= 2 * width) & (block < 3 * width)  # the chunk after the first sampled middle one
    summaries[..., 0] = torch.where(skipped[None, :, None], 10.0, 0.0) + torch.rand_like(summaries[..., 0])
    for rq_case in (rq, torch.randn_like(rq)):
        want = select._route_flat(rq_case, summaries, seq_len, config, True)
        got = triton_select.threshold_topk(rq_case, summaries, seq_len - 24, config, True)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "batch,seq_len_q,causal,subs,rows_per_call",
    [(1, 1, True, 1, None), (2, 5, True, 4, None), (1, 21, False, 4, None), (1, 37, True, 1, 8)],
    ids=["decode-token", "batch2-max4", "full-max4", "rows-in-calls"],
)
def test_split_route_matches_reference(monkeypatch, batch, seq_len_q, causal, subs, rows_per_call):
    """The few-token router (programs split the blocks) picks the reference's blocks, best first, on
    random inputs: one decode token, a batch, sub-block summaries, not causal, and tokens routed a few
    rows per call when their scores would not fit at once."""
    from subquad.ops.ssa import select, triton_select

    if rows_per_call is not None:
        monkeypatch.setattr(triton_select, "_CHUNK_ELEMENTS", rows_per_call * 2 * 203)
    torch.manual_seed(7)
    extra = {} if subs == 1 else {"summary": "max", "sub_block_size": 16 // subs}
    config = subquad.SSAConfig(block_size=16, top_k=5, **extra)
    num_blocks = 203  # four chunks of the split kernel, the last partial
    seq_len_k = num_blocks * 16 - 9
    rq = torch.randn(batch, seq_len_q, 2, 16, device=DEVICE)
    summaries = select.routing_summaries(torch.randn(batch, seq_len_k, 2, 16, device=DEVICE), config)
    if rows_per_call is not None:  # later blocks score higher: each row's picks follow its own position
        rq[..., 0] = rq[..., 0].abs() + 4.0
        summaries[..., 0] += torch.arange(summaries.shape[1], device=DEVICE)[None, :, None] / subs
    want = select._route_flat(rq, summaries, seq_len_k, config, causal)
    got = triton_select.route_flat_triton(rq, summaries, seq_len_k, config, causal, split=True)
    assert torch.equal(got, want)


def test_split_route_is_taken_for_few_tokens_and_many_summaries():
    from subquad.ops.ssa import triton_select

    assert triton_select.split_pays(1, 3145728)  # a decode step at 12M, nano `max4` summaries
    assert triton_select.split_pays(64, 16384)  # 1M keys, one summary a block
    assert not triton_select.split_pays(65, 3145728)  # a prefill chunk: the tile kernels
    assert not triton_select.split_pays(1, 2048)  # 128K keys, one summary a block: one program walks them


def test_threshold_topk_keeps_the_best_when_more_pass_than_a_list_holds(monkeypatch, host_reads):
    """Every token's top 10 are among blocks in 10 of the 64 columns of a chunk, so each of those
    columns' blocks reach the threshold (18-21 a token on the CPU, distinct scores) against lists of
    16: the lists cut in the first launch are redone keeping the best, without the host reading
    anything (a prefill would wait there for the routing kernel)."""
    from subquad.ops.ssa import select, triton_select

    monkeypatch.setattr(triton_select, "_THRESHOLD_CAP_PER_K", 1)  # lists of K_PAD = 16
    torch.manual_seed(3)
    config = subquad.SSAConfig(block_size=16, top_k=10)
    num_blocks = 140 if DEVICE == "cpu" else 330
    seq_len = num_blocks * 16 - 7
    rq = torch.zeros(1, 24, 2, 16, device=DEVICE)
    rq[..., 0] = 1.0 + torch.rand(1, 24, 2, device=DEVICE)  # every score is its block's first component
    summaries = torch.randn(1, num_blocks, 2, 16, device=DEVICE)
    column = torch.arange(num_blocks, device=DEVICE) % triton_select._THRESHOLD_BLOCK_N
    high = (column >= 1) & (column <= 10)
    noise = torch.rand(1, num_blocks, 2, device=DEVICE)
    summaries[..., 0] = torch.where(high[None, :, None], 10.0, 0.0) + noise
    want = select._route_flat(rq, summaries, seq_len, config, True)
    with host_reads() as reads:
        got = triton_select.route_flat_triton(rq, summaries, seq_len, config, True)
    assert reads.calls == []
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert _picked_scores(rq, summaries, got).equal(_picked_scores(rq, summaries, want))
