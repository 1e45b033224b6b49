"""Key-major routed forward and backward (``triton_routed``) against the query-major kernels and the
reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in tests/conftest.py
before Triton is imported) on tiny shapes, fp16 only (the interpreter mishandles bf16). Small
``chunk_tokens`` / ``segment_tokens`` make tiny shapes cross chunk and segment edges.
``poison_empty`` NaN-fills every ``torch.empty``, so an unwritten or wrongly read partial fails.
"""

import math

import pytest
import torch

import subquad
from subquad.ops.ssa import tiles
from subquad.ops.ssa.naive import sparse_attention_naive

triton_attention = pytest.importorskip("subquad.ops.ssa.triton_attention")
triton_routed = pytest.importorskip("subquad.ops.ssa.triton_routed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]

# (B, T, S, Hq, Hkv, D, block_size, top_k, causal, chunk_tokens, segment_tokens)
CASES = [
    (1, 63, 63, 4, 1, 64, 16, 1, True, 20, 3),
    (2, 45, 77, 8, 1, 32, 16, 3, True, 16, 4),
    (1, 70, 70, 2, 2, 128, 16, 2, True, None, 256),
    (1, 50, 50, 3, 1, 40, 16, 2, False, 17, 5),
    (1, 150, 150, 8, 2, 32, 16, 3, True, 64, 7),
]


def _case_id(case):
    b, t, s, hq, hkv, d, bs, top_k, causal, chunk, seg = case
    mode = "causal" if causal else "full"
    return f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-bs{bs}-k{top_k}-{mode}-chunk{chunk}-seg{seg}"


def _setup(case, dtype, holes):
    b, t, s, hq, hkv, d, bs, top_k, causal, _, _ = case
    q, k, v = (torch.randn(b, n, h, d, device=DEVICE, dtype=dtype) for n, h in ((t, hq), (s, hkv), (s, hkv)))
    config = subquad.SSAConfig(block_size=bs, top_k=top_k)
    idx = subquad.select_blocks(q, k, config, causal=causal).block_idx.clone()
    fixed = config.sink_blocks + config.local_blocks
    if holes:
        # Drop routed picks at random (middle slots included): rows with -1 between valid slots.
        routed = idx[..., fixed:]
        routed[torch.rand(routed.shape, device=DEVICE) < 0.4] = -1
    return q, k, v, idx, fixed


def _reference_lse2(q, k, block_idx, block_size, causal, scale, mask_fn):
    """Log2-domain LSE from the full fp32 score matrix restricted to the selection: ``[B, T, Hq]``."""
    t, s, hq = q.shape[1], k.shape[1], q.shape[2]
    keys = k.float().repeat_interleave(hq // k.shape[2], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float() * scale, keys)
    visible = mask_fn(block_idx, block_size, s, hq)
    if causal:
        query_pos = torch.arange(s - t, s, device=q.device)
        visible = visible & (torch.arange(s, device=q.device) <= query_pos[:, None])
    lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1) / math.log(2)
    # Empty rows: +inf, the kernels' convention (backward then gives p = 0).
    return torch.where(visible.any(-1), lse, float("inf")).transpose(1, 2)


@pytest.mark.parametrize("holes", [False, True], ids=["select", "holes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_routed_matches_query_major_and_reference(case, dtype, holes, poison_empty, reference):
    q, k, v, idx, fixed = _setup(case, dtype, holes)
    *_, block_size, _, causal, chunk, seg = case
    scale = q.shape[-1] ** -0.5
    out, lse, _ = triton_routed.sparse_attention_fwd_routed(
        q, k, v, idx, block_size, causal, scale, fixed, chunk_tokens=chunk, segment_tokens=seg
    )
    want_out, want_lse, _ = triton_attention.sparse_attention_fwd(q, k, v, idx, block_size, causal, scale)
    assert out.dtype == q.dtype and out.shape == want_out.shape and lse.shape == want_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()

    ref = sparse_attention_naive(q.float(), k.float(), v.float(), idx, block_size, causal, scale)
    mask = reference.selection_mask(idx, block_size, k.shape[1], q.shape[2])
    lowp = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask, upcast=False)
    lowp_err = (lowp.float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * lowp_err + 1e-3, (err, lowp_err)
    assert (out.float() - want_out.float()).abs().max().item() <= 2 * lowp_err + 1e-3

    ref_lse = _reference_lse2(q, k, idx, block_size, causal, scale, reference.selection_mask)
    for got in (lse, want_lse):
        assert torch.equal(torch.isinf(got), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        assert (got[finite] - ref_lse[finite]).abs().max().item() < 1e-3
    assert (lse[finite] - want_lse[finite]).abs().max().item() < 1e-4


@pytest.mark.parametrize("num_fixed", [0, 5], ids=["all-routed", "none-routed"])
def test_routed_fixed_split_edges(num_fixed, poison_empty):
    # 0: every slot (local ones too) goes key-major, so the kernel's causal mask matters; 5 = all fixed.
    case = (1, 40, 56, 4, 2, 32, 16, 2, True, 16, 4)
    q, k, v, idx, _ = _setup(case, torch.float16, holes=False)
    scale = q.shape[-1] ** -0.5
    out, lse, _ = triton_routed.sparse_attention_fwd_routed(
        q, k, v, idx, 16, True, scale, num_fixed, chunk_tokens=16, segment_tokens=4
    )
    want_out, want_lse, _ = triton_attention.sparse_attention_fwd(q, k, v, idx, 16, True, scale)
    assert (out.float() - want_out.float()).abs().max().item() < 2e-3
    assert torch.allclose(lse, want_lse, atol=1e-4, rtol=0)


def test_routed_work_groups_pairs_by_block(host_reads):
    torch.manual_seed(4)
    num_blocks, seg = 6, 3
    routed = torch.randint(-1, num_blocks, (2, 3, 20, 4), dtype=torch.int32)
    with host_reads() as reads:  # queued without waiting for the device (every prefill layer does this)
        seg_block, seg_start, seg_end, entry = triton_routed.routed_work(routed, num_blocks, seg)
    assert reads.calls == []
    # Sized by a bound: the segments needed come first, then empty ones that the kernels skip.
    used = seg_end > seg_start
    needed = int(used.sum())
    assert used[:needed].all() and needed < len(used)
    assert all((t[needed:] == 0).all() for t in (seg_block, seg_start, seg_end))
    got = []
    for blk, start, end in zip(seg_block[:needed].tolist(), seg_start.tolist(), seg_end.tolist()):
        assert 0 < end - start <= seg
        got += [(blk, int(e)) for e in entry[start:end]]
    flat = routed.view(6, 20 * 4)
    want = [(bh * num_blocks + int(flat[bh, e]), e) for bh in range(6) for e in range(80) if flat[bh, e] >= 0]
    # Same pairs, each block's pairs in (token, slot) order.
    assert got == sorted(want)


def test_partial_rows_past_int32_are_refused():
    # The kernels index a chunk's partial rows in int32; only a caller's oversized chunk_tokens gets there.
    triton_routed._check_partial_rows(65536, 32 * 16)  # the default chunk at layer-8b
    with pytest.raises(ValueError, match=r"chunk_tokens=4194304: .*2\*\*31"):
        triton_routed._check_partial_rows(4 << 20, 32 * 16)


@pytest.mark.parametrize("segment_len", [1, 2, 5])
def test_segment_owners_bound_pads_the_exact_segments(segment_len):
    """With ``max_segments`` (no host sync) the segments are the exact ones, then empty ones; the bound
    holds for owners with many items, none, or items past the owner range."""
    num_owners = 7
    counts = torch.tensor([0, 1, 11, 0, 5, 2, 0])
    owner = torch.cat([torch.arange(num_owners).repeat_interleave(counts), torch.full((4,), num_owners)])
    exact = tiles.segment_owners(owner, num_owners, segment_len)
    bound = tiles.max_segments_for(owner.numel(), num_owners, segment_len)
    padded = tiles.segment_owners(owner, num_owners, segment_len, bound)
    needed = len(exact[0])
    assert needed == sum(-(-int(c) // segment_len) for c in counts) <= bound
    for full, part in zip(padded, exact, strict=True):
        assert len(full) == bound
        assert torch.equal(full[:needed], part) and (full[needed:] == 0).all()
    empty = tiles.segment_owners(owner[:0], 0, segment_len, 3)
    assert all(len(t) == 3 and (t == 0).all() for t in empty)


def test_autograd_routed_path_matches_query_major(monkeypatch):
    case = (1, 50, 60, 8, 2, 32, 16, 2, True, None, 256)
    q, k, v, _, _ = _setup(case, torch.float16, holes=False)
    grad = torch.randn_like(q, dtype=torch.float32)
    config = subquad.SSAConfig(block_size=16, top_k=2)
    calls = {"fwd": [], "bwd": []}
    for name in ("fwd", "bwd"):
        real = getattr(triton_routed, f"sparse_attention_{name}_routed")
        monkeypatch.setattr(
            triton_routed,
            f"sparse_attention_{name}_routed",
            lambda *a, _real=real, _calls=calls[name], **kw: _calls.append(a) or _real(*a, **kw),
        )
    results = []
    for min_tokens in (10**9, 1):
        monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", min_tokens)
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = subquad.ssa_attention(*inputs, config=config, backend="triton")
        out.float().backward(grad)
        results.append((out.detach(), *(t.grad for t in inputs)))
    fixed = config.sink_blocks + config.local_blocks
    assert len(calls["fwd"]) == 1 and calls["fwd"][0][-1] == fixed
    assert len(calls["bwd"]) == 1 and calls["bwd"][0][-1] == fixed
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert not b.isnan().any(), name
        tol = 4e-3 * max(1.0, a.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() <= tol, name


def test_routed_backward_twice_with_retained_graph(monkeypatch, backward_twice):
    # The first backward uses and drops the forward's work lists; a second one rebuilds them.
    monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", 1)
    q, k, v, _, _ = _setup((1, 50, 60, 8, 2, 32, 16, 2, True, None, 256), torch.float16, holes=False)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = subquad.ssa_attention(*leaves, config=subquad.SSAConfig(block_size=16, top_k=2), backend="triton")
    backward_twice(out, leaves)


def test_fixed_part_work_lists_are_reused_per_layout(monkeypatch):
    """Selections of one ``select_blocks`` layout and shape share the fixed slots' tiles and dK/dV lists
    (built by the first call); another key length builds its own; the results are the uncached ones."""
    from collections import OrderedDict

    monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", 1)
    monkeypatch.setattr(triton_routed, "_FIXED_CACHE", OrderedDict())
    inverted = []
    invert_tiles = triton_routed.invert_tiles

    def counting_invert(*args, **kwargs):
        inverted.append(1)
        return invert_tiles(*args, **kwargs)

    monkeypatch.setattr(triton_routed, "invert_tiles", counting_invert)
    config = subquad.SSAConfig(block_size=16, top_k=2)
    for seq_len_k in (60, 60, 75):
        q = torch.randn(1, 50, 4, 32, device=DEVICE, dtype=torch.float16)
        k, v = (torch.randn(1, seq_len_k, 2, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
        sel = subquad.select_blocks(q, k, config)
        assert sel.fixed_layout == (config.sink_blocks, config.local_blocks, True)
        grad = torch.randn_like(q)
        results = []
        for layout in (sel.fixed_layout, None):
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            out = triton_attention.sparse_attention_triton(
                *leaves, sel.block_idx, 16, True, None, sel.num_fixed_slots, layout
            )
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
        for name, cached, fresh in zip(("out", "dq", "dk", "dv"), *results):
            assert torch.equal(cached, fresh), name
    assert len(triton_routed._FIXED_CACHE) == 2
    # Cached: built for S=60 and S=75, reused by the second S=60 call; uncached: every call.
    assert len(inverted) == 2 + 3


def _query_major_grads(q, k, v, idx, block_size, causal, scale, do):
    out, lse, tiles = triton_attention.sparse_attention_fwd(q, k, v, idx, block_size, causal, scale)
    return (
        out,
        lse,
        triton_attention.sparse_attention_bwd(do, q, k, v, out, lse, tiles, block_size, causal, scale),
    )


@pytest.mark.parametrize("from_plan", [False, True], ids=["own-work", "forward-plan"])
@pytest.mark.parametrize("holes", [False, True], ids=["select", "holes"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_routed_backward_matches_query_major_and_reference(case, holes, from_plan, poison_empty):
    dtype = DTYPES[-1]
    q, k, v, idx, fixed = _setup(case, dtype, holes)
    *_, block_size, _, causal, chunk, seg = case
    scale = q.shape[-1] ** -0.5
    do = torch.randn_like(q)
    out, lse, want = _query_major_grads(q, k, v, idx, block_size, causal, scale, do)
    plan = None
    if from_plan:  # the forward's tiles and per-chunk work lists (its chunk and segment sizes)
        *_, plan = triton_routed.sparse_attention_fwd_routed(
            q,
            k,
            v,
            idx,
            block_size,
            causal,
            scale,
            fixed,
            chunk_tokens=chunk,
            segment_tokens=seg,
            keep_plan=True,
        )
        assert len(plan.chunks) == -(-q.shape[1] // plan.chunk_tokens)
    got = triton_routed.sparse_attention_bwd_routed(
        do,
        q,
        k,
        v,
        out,
        lse,
        idx,
        block_size,
        causal,
        scale,
        fixed,
        # With a plan, its chunks (not the default single chunk) must be followed.
        chunk_tokens=None if from_plan else chunk,
        segment_tokens=seg,
        plan=plan,
    )
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = sparse_attention_naive(*ref_inputs, idx, block_size, causal, scale)
    ref.backward(do.float())
    for name, g, w, r in zip("qkv", got, want, (t.grad for t in ref_inputs)):
        assert g.dtype == w.dtype and g.shape == w.shape and not g.isnan().any(), name
        scale_r = max(1.0, r.abs().max().item())
        lowp_err = (w.float() - r).abs().max().item()
        assert (g.float() - r).abs().max().item() <= 2 * lowp_err + 2e-3 * scale_r, name
        assert (g.float() - w.float()).abs().max().item() <= 2 * lowp_err + 2e-3 * scale_r, name


@pytest.mark.parametrize("num_fixed", [0, 5], ids=["all-routed", "none-routed"])
def test_routed_backward_fixed_split_edges(num_fixed, poison_empty):
    case = (1, 40, 56, 4, 2, 32, 16, 2, True, 16, 4)
    q, k, v, idx, _ = _setup(case, torch.float16, holes=False)
    scale = q.shape[-1] ** -0.5
    do = torch.randn_like(q)
    out, lse, want = _query_major_grads(q, k, v, idx, 16, True, scale, do)
    got = triton_routed.sparse_attention_bwd_routed(
        do, q, k, v, out, lse, idx, 16, True, scale, num_fixed, chunk_tokens=8, segment_tokens=4
    )
    for name, g, w in zip("qkv", got, want):
        assert (g.float() - w.float()).abs().max().item() < 2e-3 * max(1.0, w.abs().max().item()), name


def test_query_rows_past_int32_are_refused():
    # The routed kernels index q's (batch, token, head) rows in int32; shapes only, nothing allocated.
    q = torch.empty(1, 2**26, 32, 128, device="meta")
    with pytest.raises(ValueError, match=r"q: 1 x 67108864 x 32 rows .*2\*\*31"):
        triton_routed._check_query_rows(q)
    triton_routed._check_query_rows(torch.empty(1, 2**26 - 1, 32, 128, device="meta"))
