"""The PyTorch reference path of SSA (routing + ``naive``) against dense attention, on the CPU.

Checks the contract of DESIGN.md ("SSA semantics"): full budget equals dense; every output equals dense
attention masked to the returned selection; strict causality; sink and local blocks always present;
a planted needle is routed; gradients; the tree and beam indexes; attention recall.
"""

from __future__ import annotations

import pytest
import torch

import subquad
import subquad.ops.ssa.naive as naive_module
import subquad.ops.ssa.select as select_module
from subquad import SSAConfig, SSASelection, attention_recall, block_summaries, select_blocks, ssa_attention
from subquad.ops.ssa.select import (
    beam_cost_per_query,
    best_of_stretches,
    routing_agreement,
    tree_cost_per_query,
    tree_shape,
)

BLOCK = 16

# (batch, seq_len_q, seq_len_k, heads_q, heads_kv, head_dim): odd lengths, GQA 1/4/8, D 64/128, T < S.
SHAPES = [
    (1, 63, 63, 4, 1, 64),
    (2, 63, 63, 4, 4, 64),
    (1, 1000, 1000, 8, 1, 64),
    (1, 300, 1000, 4, 1, 128),
    (2, 1, 1000, 8, 8, 128),
    (1, 4097, 4097, 1, 1, 16),
]
# bf16 runs on all but the longest shape (the fp32 run already covers 4097's indexing).
SHAPE_DTYPES = [(s, torch.float32) for s in SHAPES] + [(s, torch.bfloat16) for s in SHAPES if s[1] < 4000]
# Full budget gathers every key for every token (O(T * S)): the two largest shapes run once, in fp32.
FULL_CASES = [(s, d) for s, d in SHAPE_DTYPES if s[1] * s[2] < 10**6 or (s[1] == 1000 and d == torch.float32)]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def shape_id(shape):
    b, t, s, hq, hkv, d = shape
    return f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}"


def shape_dtype_id(case):
    shape, dtype = case
    return f"{shape_id(shape)}-{DTYPE_NAMES[dtype]}"


def random_qkv(batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim, dtype=torch.float32, dim_v=None):
    q = torch.randn(batch, seq_len_q, heads_q, dim).to(dtype)
    k = torch.randn(batch, seq_len_k, heads_kv, dim).to(dtype)
    v = torch.randn(batch, seq_len_k, heads_kv, dim_v or dim).to(dtype)
    return q, k, v


def num_blocks(seq_len_k, block_size=BLOCK):
    return -(-seq_len_k // block_size)


def full_budget(seq_len_k, **kwargs):
    return SSAConfig(block_size=BLOCK, top_k=num_blocks(seq_len_k), **kwargs)


def assert_matches(out, exact, low=None, atol=1e-5, low_atol=2e-3):
    """fp32: close to ``exact``. Low precision (flash-attn's rule): the error against the fp32 ``exact``
    is at most twice that of ``low``, the same computation done by PyTorch in the low precision."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=atol, rtol=1e-4)
        return
    err = (out.float() - exact).abs().max().item()
    low_err = (low.float() - exact).abs().max().item()
    assert err <= 2 * low_err + low_atol, (
        f"error {err:.3g} > 2 x low-precision error {low_err:.3g} + {low_atol}"
    )


def query_blocks(seq_len_q, seq_len_k):
    return (torch.arange(seq_len_q) + seq_len_k - seq_len_q) // BLOCK


# (a) full budget equals dense


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize("case", FULL_CASES, ids=shape_dtype_id)
def test_full_budget_equals_dense_causal(case, index, reference):
    shape, dtype = case
    q, k, v = random_qkv(*shape, dtype=dtype)
    out, sel = ssa_attention(
        q, k, v, full_budget(shape[2], index=index), backend="torch", return_selection=True
    )
    assert out.dtype == dtype and out.shape == q.shape
    # Every causally visible block is selected, so nothing may be dropped.
    assert (sel.num_selected_keys(shape[2]) >= (torch.arange(shape[1]) + shape[2] - shape[1] + 1)).all()
    exact = subquad.dense_attention(q.float(), k.float(), v.float())
    low = reference.attention(q, k, v, upcast=False) if dtype != torch.float32 else None
    assert_matches(out, exact, low)


NONCAUSAL_SHAPES = [(1, 63, 63, 4, 1, 64), (1, 37, 200, 8, 2, 64), (2, 100, 45, 4, 2, 32)]


@pytest.mark.parametrize("index", ["flat", "tree"])
@pytest.mark.parametrize("shape", NONCAUSAL_SHAPES, ids=shape_id)
def test_full_budget_equals_dense_noncausal(shape, index):
    q, k, v = random_qkv(*shape)
    out = ssa_attention(q, k, v, full_budget(shape[2], index=index), causal=False)
    torch.testing.assert_close(out, subquad.dense_attention(q, k, v, causal=False), atol=1e-5, rtol=1e-4)


def test_full_budget_dense_with_distinct_value_dim():
    q, k, v = random_qkv(1, 50, 111, 8, 2, 32, dim_v=24)
    out = ssa_attention(q, k, v, full_budget(111))
    assert out.shape == (1, 50, 8, 24)
    torch.testing.assert_close(out, subquad.dense_attention(q, k, v), atol=1e-5, rtol=1e-4)


# (b) sparse budget equals dense masked to the returned selection


SPARSE_CASES = [(s, d) for s, d in SHAPE_DTYPES if s[2] > 6 * BLOCK]


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=shape_dtype_id)
def test_sparse_equals_masked_dense(case, index, reference):
    shape, dtype = case
    batch, seq_len_q, seq_len_k, heads_q = shape[:4]
    q, k, v = random_qkv(*shape, dtype=dtype)
    config = SSAConfig(block_size=BLOCK, top_k=2, sink_blocks=1, local_blocks=2, index=index)
    out, sel = ssa_attention(q, k, v, config, backend="torch", return_selection=True)
    assert sel.block_idx.shape == (batch, shape[4], seq_len_q, config.blocks_per_query)
    mask = reference.selection_mask(sel.block_idx, sel.block_size, seq_len_k, heads_q)
    # The budget is really sparse: the last token sees far fewer keys than its causal prefix.
    assert int(sel.num_selected_keys(seq_len_k)[..., -1].max()) <= config.max_keys < seq_len_k
    exact = reference.attention(q, k, v, mask=mask)
    low = reference.attention(q, k, v, mask=mask, upcast=False) if dtype != torch.float32 else None
    assert_matches(out, exact, low)
    # And the selection matters: unmasked dense attention is a different answer.
    assert not torch.allclose(
        out.float(), subquad.dense_attention(q.float(), k.float(), v.float()), atol=1e-2
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "sink,local,top_k",
    [(0, 1, 1), (2, 3, 2), (3, 1, 0)],
    ids=["sink0-local1-k1", "sink2-local3-k2", "sink3-local1-k0"],
)
def test_sparse_equals_masked_dense_configs(sink, local, top_k, causal, reference):
    q, k, v = random_qkv(2, 70, 170, 8, 2, 32)
    config = SSAConfig(block_size=BLOCK, top_k=top_k, sink_blocks=sink, local_blocks=local)
    out, sel = ssa_attention(q, k, v, config, causal=causal, return_selection=True)
    mask = reference.selection_mask(sel.block_idx, BLOCK, 170, 8)
    torch.testing.assert_close(
        out, reference.attention(q, k, v, causal=causal, mask=mask), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_custom_scale(causal, reference):
    q, k, v = random_qkv(1, 50, 120, 4, 2, 32)
    config = SSAConfig(block_size=BLOCK, top_k=2)
    out, sel = ssa_attention(q, k, v, config, causal=causal, scale=0.3, return_selection=True)
    mask = reference.selection_mask(sel.block_idx, BLOCK, 120, 4)
    expected = reference.attention(q, k, v, causal=causal, scale=0.3, mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    full = ssa_attention(q, k, v, full_budget(120), causal=causal, scale=0.3)
    torch.testing.assert_close(
        full, subquad.dense_attention(q, k, v, causal=causal, scale=0.3), atol=1e-5, rtol=1e-4
    )


def test_reused_selection_and_precomputed_summaries_give_same_result():
    q, k, v = random_qkv(1, 90, 200, 4, 2, 32)
    config = SSAConfig(block_size=BLOCK, top_k=3)
    out, sel = ssa_attention(q, k, v, config, return_selection=True)
    again = ssa_attention(q, k, v, config, selection=sel)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    out2, sel2 = ssa_attention(q, k, v, config, summaries=block_summaries(k, BLOCK), return_selection=True)
    assert torch.equal(sel2.block_idx, sel.block_idx)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    # A different (valid) selection gives a different output: the given selection is really used.
    other = SSASelection(torch.where(sel.block_idx == 0, -1, sel.block_idx), BLOCK)
    assert not torch.allclose(ssa_attention(q, k, v, config, selection=other), out)


def test_chunked_paths_equal_unchunked(monkeypatch):
    q, k, v = random_qkv(2, 77, 200, 8, 2, 16)
    configs = [SSAConfig(block_size=BLOCK, top_k=3, index=i, tree_group=2) for i in ("flat", "tree", "beam")]
    before = [ssa_attention(q, k, v, c, return_selection=True) for c in configs]
    # One query per chunk everywhere: the chunk loops and their position offsets are exercised.
    for module in (naive_module, select_module):
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(module, "_CPU_CHUNK_ELEMENTS", 1)
    after = [ssa_attention(q, k, v, c, return_selection=True) for c in configs]
    for (out, sel), (out2, sel2) in zip(before, after):
        assert torch.equal(sel.block_idx, sel2.block_idx)
        torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-5)


def test_backend_auto_on_cpu_is_torch_and_outputs_are_written(poison_empty, reference):
    q, k, v = random_qkv(1, 63, 63, 4, 1, 64, dtype=torch.bfloat16)
    assert torch.empty(2, dtype=torch.bfloat16).isnan().all()
    assert torch.empty_like(q).isnan().all()
    assert q.new_empty(3).isnan().all()
    assert not torch.empty(2, dtype=torch.int32).is_floating_point()
    out, sel = ssa_attention(
        q, k, v, SSAConfig(block_size=BLOCK, top_k=1), backend="auto", return_selection=True
    )
    assert torch.isfinite(out.float()).all()
    ref = ssa_attention(q, k, v, selection=sel, backend="torch")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# (c) causality


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize(
    "shape,position",
    [((1, 200, 200, 4, 1, 32), 100), ((1, 200, 200, 4, 1, 32), 143), ((1, 150, 333, 8, 2, 64), 250)],
    ids=["T200-p100", "T200-p143", "T150-S333-p250"],
)
def test_causality_later_inputs_do_not_change_earlier_outputs(shape, position, index):
    batch, seq_len_q, seq_len_k = shape[:3]
    q, k, v = random_qkv(*shape)
    config = SSAConfig(block_size=BLOCK, top_k=2, index=index, tree_group=2 if index != "flat" else None)
    out, sel = ssa_attention(q, k, v, config, return_selection=True)
    row = position - (seq_len_k - seq_len_q)  # query row sitting at absolute position `position`
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, row + 1 :] = 3 * torch.randn_like(q2[:, row + 1 :])
    k2[:, position + 1 :] = 3 * torch.randn_like(k2[:, position + 1 :])
    v2[:, position + 1 :] = 3 * torch.randn_like(v2[:, position + 1 :])
    out2, sel2 = ssa_attention(q2, k2, v2, config, return_selection=True)
    assert torch.equal(sel2.block_idx[:, :, : row + 1], sel.block_idx[:, :, : row + 1])
    torch.testing.assert_close(out2[:, : row + 1], out[:, : row + 1], atol=1e-6, rtol=0)
    # The perturbation was real: later routing and outputs did change.
    assert not torch.equal(sel2.block_idx[:, :, row + 1 :], sel.block_idx[:, :, row + 1 :])
    assert not torch.allclose(out2[:, row + 1 :], out[:, row + 1 :])


def test_causality_incremental_decode_equals_full_forward():
    q, k, v = random_qkv(1, 120, 120, 4, 2, 32)
    config = SSAConfig(block_size=BLOCK, top_k=2)
    full = ssa_attention(q, k, v, config)
    for step in (0, 17, 63, 64, 119):
        one = ssa_attention(q[:, step : step + 1], k[:, : step + 1], v[:, : step + 1], config)
        torch.testing.assert_close(one[:, 0], full[:, step], atol=1e-6, rtol=1e-5)


# (d) selection structure


def expected_candidates(qblock, nb, config, causal):
    """Blocks a token may route to: not a sink, not in its local window, causally before it."""
    blocks = torch.arange(nb)
    in_window = (blocks > qblock - config.local_blocks) & (blocks <= qblock)
    ok = (blocks >= config.sink_blocks) & ~in_window
    if causal:
        ok &= blocks <= qblock - config.local_blocks
    return blocks[ok]


@pytest.mark.parametrize(
    "index,causal",
    [("flat", True), ("flat", False), ("tree", True), ("tree", False), ("beam", True)],
    ids=["flat-causal", "flat-noncausal", "tree-causal", "tree-noncausal", "beam-causal"],
)
@pytest.mark.parametrize(
    "sink,local,top_k",
    [(1, 2, 3), (0, 1, 2), (2, 3, 1), (3, 1, 5)],
    ids=["sink1-local2-k3", "sink0-local1-k2", "sink2-local3-k1", "sink3-local1-k5"],
)
def test_selection_structure(sink, local, top_k, causal, index):
    batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim = 2, 45, 173, 4, 2, 16
    q, k, _ = random_qkv(batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim)
    # Beam nodes of 2 blocks: with 8 (the default) its top_k nodes would hold every block, and it routes flat.
    config = SSAConfig(
        block_size=BLOCK,
        top_k=top_k,
        sink_blocks=sink,
        local_blocks=local,
        index=index,
        tree_group=2 if index == "beam" else None,
    )
    sel = select_blocks(q, k, config, causal=causal)
    idx = sel.block_idx
    nb = num_blocks(seq_len_k)
    assert idx.dtype == torch.int32 and sel.block_size == BLOCK
    assert idx.shape == (batch, heads_kv, seq_len_q, sink + local + top_k)
    assert int(idx.min()) >= -1 and int(idx.max()) < nb
    qblocks = query_blocks(seq_len_q, seq_len_k)
    for b in range(batch):
        for h in range(heads_kv):
            for t in range(seq_len_q):
                row = idx[b, h, t].tolist()
                qb = int(qblocks[t])
                valid = [x for x in row if x >= 0]
                assert len(valid) == len(set(valid)), f"repeated block in {row}"
                # Slots in order: sinks, local window (oldest first), routed.
                window = [j if j >= 0 else -1 for j in range(qb - local + 1, qb + 1)]
                assert row[sink : sink + local] == window
                for j, slot in enumerate(row[:sink]):
                    visible = j < nb and not (qb - local < j <= qb) and (j <= qb or not causal)
                    assert slot == (j if visible else -1), f"sink slot {j} of row {row}"
                routed = [x for x in row[sink + local :] if x >= 0]
                candidates = expected_candidates(qb, nb, config, causal).tolist()
                assert set(routed) <= set(candidates)
                if causal:
                    assert all(x < qb - local + 1 for x in routed), (
                        "routed block at or after the local window"
                    )
                # The indexes probe top_k groups of >= 2 blocks: they find as many blocks as flat does.
                assert len(routed) == min(top_k, len(candidates))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_flat_router_is_exact_top_k(causal):
    batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim = 2, 60, 250, 8, 2, 32
    q, k, _ = random_qkv(batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim)
    config = SSAConfig(block_size=BLOCK, top_k=3)
    sel = select_blocks(q, k, config, causal=causal)
    nb = num_blocks(seq_len_k)
    # Brute force: mean key of each block against the sum of the KV head's query heads.
    summaries = torch.stack([k[:, j * BLOCK : (j + 1) * BLOCK].mean(1) for j in range(nb)], dim=1)
    routing_q = q.view(batch, seq_len_q, heads_kv, heads_q // heads_kv, dim).sum(3)
    scores = torch.einsum("bthd,bnhd->bhtn", routing_q, summaries)
    qblocks = query_blocks(seq_len_q, seq_len_k)
    for t in range(seq_len_q):
        candidates = expected_candidates(int(qblocks[t]), nb, config, causal)
        for b in range(batch):
            for h in range(heads_kv):
                best = candidates[scores[b, h, t, candidates].topk(min(3, len(candidates))).indices]
                assert set(sel.block_idx[b, h, t, -3:].tolist()) - {-1} == set(best.tolist())


def test_gqa_heads_share_the_routing_of_their_summed_queries():
    q, k, _ = random_qkv(1, 40, 200, 8, 2, 16)
    config = SSAConfig(block_size=BLOCK, top_k=2)
    sel = select_blocks(q, k, config)
    # Permuting the query heads inside a KV group leaves the sum, hence the selection, unchanged.
    permuted = q[:, :, [3, 1, 0, 2, 7, 4, 6, 5]]
    assert torch.equal(select_blocks(permuted, k, config).block_idx, sel.block_idx)
    # Moving a head to the other group changes it.
    swapped = q[:, :, [4, 1, 2, 3, 0, 5, 6, 7]]
    assert not torch.equal(select_blocks(swapped, k, config).block_idx, sel.block_idx)


def test_top_k_zero_keeps_only_sink_and_local():
    q, k, v = random_qkv(1, 80, 80, 4, 1, 16)
    config = SSAConfig(block_size=BLOCK, top_k=0, sink_blocks=1, local_blocks=1)
    out, sel = ssa_attention(q, k, v, config, return_selection=True)
    assert sel.block_idx.shape[-1] == 2
    qb = query_blocks(80, 80)
    assert torch.equal(sel.block_idx[0, 0, :, 1], qb.to(torch.int32))
    assert torch.equal(sel.block_idx[0, 0, :, 0], torch.where(qb > 0, 0, -1).to(torch.int32))


def test_block_summaries_are_block_means_with_partial_last_block():
    k = torch.randn(2, 50, 3, 8)
    summ = block_summaries(k, BLOCK)
    assert summ.shape == (2, 4, 3, 8) and summ.dtype == torch.float32
    for j in range(4):
        torch.testing.assert_close(summ[:, j], k[:, j * BLOCK : (j + 1) * BLOCK].mean(1))
    assert torch.allclose(block_summaries(k.to(torch.bfloat16), BLOCK), summ, atol=3e-2)


def test_num_selected_keys_counts_partial_blocks():
    sel = SSASelection(torch.tensor([[[[0, 3, -1], [2, -1, -1]]]], dtype=torch.int32), BLOCK)
    # Block 3 of a 50-key sequence holds keys 48 and 49 only.
    assert sel.num_selected_keys(50).tolist() == [[[16 + 2, 16]]]


# (e) needle


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize("needle", [3, 30, 55])
def test_planted_needle_is_routed(needle, index):
    batch, seq_len_k, heads_q, heads_kv, dim = 1, 1000, 8, 2, 64
    q = torch.randn(batch, 64, heads_q, dim)
    k = torch.randn(batch, seq_len_k, heads_kv, dim)
    v = torch.randn(batch, seq_len_k, heads_kv, dim)
    direction = torch.nn.functional.normalize(torch.randn(heads_kv, dim), dim=-1)
    # Keys of one block and the last 16 queries share a direction (per KV head, all its query heads).
    k[:, needle * BLOCK : (needle + 1) * BLOCK] += 4 * direction
    q[:, -16:] += 4 * direction.repeat_interleave(heads_q // heads_kv, dim=0)
    config = SSAConfig(block_size=BLOCK, top_k=2, index=index)
    out, sel = ssa_attention(q, k, v, config, return_selection=True)
    routed = sel.block_idx[..., -config.top_k :]
    assert (routed[:, :, -16:] == needle).any(-1).all(), "needle block not routed for an aligned query"
    # Routing it captures dense attention mass that sink + local blocks alone miss.
    recall = attention_recall(q, k, sel, reduction="none")[:, -16:].mean()
    fixed_only = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=0))
    assert recall > attention_recall(q, k, fixed_only, reduction="none")[:, -16:].mean() + 0.05


# (f) gradients


GRAD_SHAPES = [(1, 63, 63, 4, 1, 64), (2, 70, 150, 8, 2, 32), (1, 97, 97, 2, 2, 128)]


def gradients(fn, q, k, v, grad_out):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out)


def assert_grads_close(got, want, atol=1e-5):
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_gradients_full_budget_equal_dense(shape, index):
    q, k, v = random_qkv(*shape)
    grad_out = torch.randn_like(q)
    config = full_budget(shape[2], index=index)
    got = gradients(lambda *t: ssa_attention(*t, config), q, k, v, grad_out)
    want = gradients(subquad.dense_attention, q, k, v, grad_out)
    assert_grads_close(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_gradients_sparse_equal_masked_dense(shape, causal, reference):
    q, k, v = random_qkv(*shape)
    grad_out = torch.randn_like(q)
    config = SSAConfig(block_size=BLOCK, top_k=1, local_blocks=1)
    sel = select_blocks(q, k, config, causal=causal)
    mask = reference.selection_mask(sel.block_idx, BLOCK, shape[2], shape[3])
    got = gradients(lambda *t: ssa_attention(*t, config, causal=causal), q, k, v, grad_out)
    want = gradients(lambda *t: reference.attention(*t, causal=causal, mask=mask), q, k, v, grad_out)
    assert_grads_close(got, want)
    # The budget is sparse, so the gradients differ from dense ones.
    dense_grads = gradients(lambda *t: subquad.dense_attention(*t, causal=causal), q, k, v, grad_out)
    assert not torch.allclose(got[0], dense_grads[0], atol=1e-3)


def test_gradients_bf16_within_3x_of_pytorch_bf16(reference):
    q, k, v = random_qkv(1, 100, 100, 4, 1, 64, dtype=torch.bfloat16)
    grad_out = torch.randn(1, 100, 4, 64).to(torch.bfloat16)
    config = SSAConfig(block_size=BLOCK, top_k=2)
    sel = select_blocks(q, k, config)
    mask = reference.selection_mask(sel.block_idx, BLOCK, 100, 4)
    got = gradients(lambda *t: ssa_attention(*t, config), q, k, v, grad_out)
    exact = gradients(
        lambda *t: reference.attention(*t, mask=mask), q.float(), k.float(), v.float(), grad_out.float()
    )
    low = gradients(lambda *t: reference.attention(*t, mask=mask, upcast=False), q, k, v, grad_out)
    for name, g, e, lo in zip("qkv", got, exact, low):
        assert g.dtype == torch.bfloat16
        err = (g.float() - e).abs().max().item()
        low_err = (lo.float() - e).abs().max().item()
        assert err <= 3 * low_err + 2e-3, f"d{name}: error {err:.3g} > 3 x {low_err:.3g}"


# (g) the tree index


def routed_agreement(flat, tree, top_k):
    """Share of the flat router's routed blocks that the tree also picks."""
    f, t = flat.block_idx[..., -top_k:], tree.block_idx[..., -top_k:]
    hit = ((f[..., :, None] == t[..., None, :]).any(-1) & (f >= 0)).sum()
    return hit.item() / max(1, (f >= 0).sum().item())


def test_routing_agreement_matches_a_per_token_count():
    # Two routers on the same odd-length inputs, one probing few groups: partial agreement, counted
    # token by token and head by head as the oracle.
    q, k, _ = random_qkv(2, 150, 1001, 4, 2, 16)
    flat = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=5))
    tree = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=5, index="tree", tree_group=4, tree_probe=2))
    hits = total = 0
    for f_row, t_row in zip(
        flat.block_idx[..., -5:].reshape(-1, 5).tolist(), tree.block_idx[..., -5:].reshape(-1, 5).tolist()
    ):
        chosen = [b for b in f_row if b >= 0]
        hits += sum(b in t_row for b in chosen)
        total += len(chosen)
    agreement = routing_agreement(flat, tree)
    assert 0.0 < agreement < 1.0 and agreement == pytest.approx(hits / total)
    assert agreement == pytest.approx(routed_agreement(flat, tree, 5))
    assert routing_agreement(flat, flat) == 1.0
    with pytest.raises(ValueError, match="different inputs"):
        routing_agreement(flat, select_blocks(q[:, :10], k, SSAConfig(block_size=BLOCK, top_k=5)))


@pytest.mark.parametrize("probeable", [0, 2, 5, 19, 64])
def test_tree_probes_the_best_group_of_each_stretch(probeable):
    # index="tree" deals the groups a token may probe into `probe` interleaved stretches (group g into
    # stretch g % probe) and probes the best of each (not the `probe` best overall); ties go to the
    # larger group id.
    probe, num_groups = 4, 70
    bound = torch.randn(3, num_groups)
    bound[:, probeable:] = float("-inf")  # at or after the window
    bound[0, :probeable] = torch.arange(probeable, dtype=torch.float)  # the best ones neighbours
    bound[1, : min(probeable, 3)] = 5.0  # a tie
    got = best_of_stretches(bound, probe)
    for row, want_row in zip(bound.tolist(), got.tolist()):
        for s, picked in enumerate(want_row):
            members = range(s, probeable, probe)
            want = max(members, key=lambda g: (row[g], g), default=-1)
            assert picked == want, (s, list(members))
    if probeable >= probe:
        assert (got >= 0).all(), "every stretch holds a group once there are `probe` of them"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "seq_len_q,seq_len_k,group", [(200, 200, 2), (37, 513, 4), (1, 513, 8), (120, 300, 3)], ids=str
)
def test_tree_probing_every_group_equals_flat(seq_len_q, seq_len_k, group, causal):
    q, k, _ = random_qkv(2, seq_len_q, seq_len_k, 4, 2, 16)
    nb = num_blocks(seq_len_k)
    flat = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=3), causal=causal)
    config = SSAConfig(block_size=BLOCK, top_k=3, index="tree", tree_group=group, tree_probe=-(-nb // group))
    tree = select_blocks(q, k, config, causal=causal)
    assert routing_agreement(flat, tree) == routed_agreement(flat, tree, 3) == 1.0
    assert torch.equal(flat.block_idx.sort(-1).values, tree.block_idx.sort(-1).values)


def clustered_inputs(seq_len_k=4096, heads_q=4, heads_kv=2, dim=32, queries=256):
    """Keys in topic segments of 4-24 blocks sharing a centre; each query leans towards one topic."""
    nb = seq_len_k // BLOCK
    lengths = torch.randint(4, 25, (nb,))
    topic = torch.searchsorted(torch.cumsum(lengths, 0), torch.arange(nb), right=True)
    centres = 2 * torch.randn(1, int(topic.max()) + 1, heads_kv, dim)
    k = centres[:, topic].repeat_interleave(BLOCK, 1) + torch.randn(1, seq_len_k, heads_kv, dim)
    target = torch.randint(0, int(topic.max()) + 1, (queries,))
    q = torch.randn(1, queries, heads_q, dim) + centres[:, target].repeat_interleave(heads_q // heads_kv, 2)
    return q, k


def test_tree_agrees_with_flat_on_clustered_keys():
    q, k = clustered_inputs()
    top_k = 4
    flat = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=top_k))
    config = SSAConfig(block_size=BLOCK, top_k=top_k, index="tree")
    tree = select_blocks(q, k, config)
    group, probe = tree_shape(4096 // BLOCK, config)
    assert probe * group < 4096 // BLOCK // 2, "the tree must actually skip groups for this test to mean much"
    assert routing_agreement(flat, tree) >= 0.9


@pytest.mark.parametrize("needle", [21, 42])
def test_tree_group_bound_holds_next_to_anticorrelated_blocks(needle):
    # The needle's group mates point the opposite way: a group score that is not a true upper bound
    # (e.g. the query against the elementwise max alone) hides the needle's group; the real bound cannot.
    heads_q, heads_kv, dim, group = 4, 2, 32, 4
    k = 0.3 * torch.randn(1, 64 * BLOCK, heads_kv, dim)
    direction = torch.nn.functional.normalize(torch.randn(heads_kv, dim), dim=-1)
    first = needle // group * group
    for block in range(first, first + group):
        k[:, block * BLOCK : (block + 1) * BLOCK] += (3 if block == needle else -3) * direction
    q = direction.repeat_interleave(heads_q // heads_kv, dim=0).expand(1, 8, heads_q, dim)
    config = SSAConfig(block_size=BLOCK, top_k=1, index="tree", tree_group=group, tree_probe=1)
    tree = select_blocks(q, k, config)
    assert (tree.block_idx[..., -1] == needle).all()
    assert torch.equal(tree.block_idx, select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=1)).block_idx)


@pytest.mark.parametrize("group", [None, 2, 4])
def test_tree_causality_later_keys_do_not_change_picks(group):
    q, k, _ = random_qkv(1, 300, 300, 4, 2, 16)
    config = SSAConfig(
        block_size=BLOCK, top_k=3, index="tree", tree_group=group, tree_probe=1 if group else None
    )
    sel = select_blocks(q, k, config)
    qblocks = query_blocks(300, 300)
    routed = sel.block_idx[..., -3:].long()
    assert ((routed < (qblocks - config.local_blocks + 1)[:, None]) | (routed < 0)).all()
    for position in (97, 160, 223):
        k2 = k.clone()
        k2[:, position + 1 :] = 5 * torch.randn_like(k2[:, position + 1 :])
        sel2 = select_blocks(q, k2, config)
        assert torch.equal(sel2.block_idx[:, :, : position + 1], sel.block_idx[:, :, : position + 1])
        assert not torch.equal(sel2.block_idx[:, :, position + 1 :], sel.block_idx[:, :, position + 1 :])


def test_tree_cost_grows_sublinearly():
    config = SSAConfig(block_size=64, top_k=16, index="tree")
    costs = {n: tree_cost_per_query(n, config) for n in (1 << 10, 1 << 14, 1 << 18)}
    # 16x more blocks: sqrt growth is 4x, linear would be 16x.
    assert costs[1 << 14] / costs[1 << 10] < 6
    assert costs[1 << 18] / costs[1 << 14] < 6
    assert costs[1 << 18] < (1 << 18) / 20
    assert tree_cost_per_query(100, SSAConfig(top_k=0, index="tree")) > 0


# (h) attention recall


def brute_force_recall(q, k, sel, causal=True, reference=None):
    """Share of the dense softmax mass inside the selection, from the full probability matrix."""
    heads_q, dim = q.shape[2], q.shape[3]
    seq_len_q, seq_len_k = q.shape[1], k.shape[1]
    group = heads_q // k.shape[2]
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double().repeat_interleave(group, 2)) * dim**-0.5
    if causal:
        query_pos = torch.arange(seq_len_q) + seq_len_k - seq_len_q
        scores = scores.masked_fill(torch.arange(seq_len_k) > query_pos[:, None], float("-inf"))
    probs = scores.softmax(-1)
    mask = reference.selection_mask(sel.block_idx, sel.block_size, seq_len_k, heads_q)
    return (probs * mask).sum(-1).permute(0, 2, 1).float()  # [B, T, Hq]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_recall_is_one_at_full_budget(causal):
    q, k, _ = random_qkv(2, 90, 250, 8, 2, 32)
    sel = select_blocks(q, k, full_budget(250), causal=causal)
    recall = attention_recall(q, k, sel, causal=causal, reduction="none")
    torch.testing.assert_close(recall, torch.ones_like(recall), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [(2, 90, 250, 8, 2, 32), (1, 1000, 1000, 4, 1, 64)], ids=shape_id)
def test_recall_matches_brute_force(shape, causal, reference):
    q, k, _ = random_qkv(*shape)
    sel = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=2), causal=causal)
    recall = attention_recall(q, k, sel, causal=causal, reduction="none")
    assert recall.shape == (shape[0], shape[1], shape[3])
    expected = brute_force_recall(q, k, sel, causal, reference)
    torch.testing.assert_close(recall, expected, atol=1e-5, rtol=1e-4)
    assert recall.min() < 0.99, "budget too large for the recall to be tested"
    torch.testing.assert_close(
        attention_recall(q, k, sel, causal=causal), expected.mean(), atol=1e-5, rtol=1e-4
    )


def test_recall_custom_scale(reference):
    q, k, _ = random_qkv(1, 50, 120, 4, 2, 16)
    sel = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=1))
    sharp = attention_recall(q, k, sel, scale=2.0, reduction="none")
    default = attention_recall(q, k, sel, reduction="none")
    torch.testing.assert_close(default, brute_force_recall(q, k, sel, True, reference), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sharp, default, atol=1e-3)


@pytest.mark.parametrize("max_queries", [1, 7, 90, 500])
def test_recall_max_queries_subset(max_queries):
    q, k, _ = random_qkv(2, 90, 250, 8, 2, 32)
    sel = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=2))
    full = attention_recall(q, k, sel, reduction="none")
    subset = attention_recall(q, k, sel, reduction="none", max_queries=max_queries)
    count = min(max_queries, 90)
    assert subset.shape == (2, count, 8)
    # Evenly spaced rows, first and last included.
    rows = torch.linspace(0, 89, count).round().long().unique()
    torch.testing.assert_close(subset, full[:, rows], atol=1e-6, rtol=0)
    if count > 1:
        assert rows[0] == 0 and rows[-1] == 89


# (h) the beam index


@pytest.mark.parametrize(
    "seq_len_q,seq_len_k,fanout,sink,local",
    [(40, 1000, 2, 1, 2), (1000, 1000, 4, 5, 3), (1, 4097, 2, 0, 1), (77, 4097, 8, 9, 2)],
)
def test_beam_keeping_every_node_equals_flat(seq_len_q, seq_len_k, fanout, sink, local):
    # With at least as many kept nodes as level-1 nodes, every candidate block reaches the last level
    # (select_blocks then routes flat outright: the beam reference is called here).
    rq, summaries = torch.randn(1, seq_len_q, 2, 32), torch.randn(1, num_blocks(seq_len_k), 2, 32)
    common = {"block_size": BLOCK, "top_k": 5, "sink_blocks": sink, "local_blocks": local}
    flat = select_module._route_flat(rq, summaries, seq_len_k, SSAConfig(**common), True)
    config = SSAConfig(**common, index="beam", tree_group=fanout, tree_probe=num_blocks(seq_len_k))
    beam = select_module._route_beam(rq, summaries, seq_len_k, config, True)
    assert torch.equal(flat.sort(-1).values, beam.sort(-1).values)


def test_beam_finds_what_its_bounds_point_to():
    # 256 blocks, fan-out 4, one node kept per level: the only path whose bounds a needle raises is the
    # one down to it, so the beam must find the needle block among 255 look-alikes (a flat-equal pick).
    dim, needle = 32, 150
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    k = torch.randn(1, 256 * BLOCK, 1, dim) * 0.1
    k[0, needle * BLOCK : (needle + 1) * BLOCK] += 2 * direction
    q = (direction * 5 + 0.1 * torch.randn(8, dim)).view(1, 8, 1, dim)
    config = SSAConfig(block_size=BLOCK, top_k=1, index="beam", tree_group=4, tree_probe=1)
    sel = select_blocks(q, k, config)
    assert (sel.block_idx[..., -1] == needle).all()
    assert torch.equal(sel.block_idx, select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=1)).block_idx)


def test_beam_prunes_and_stays_causal():
    # Few kept nodes over 256 blocks: fewer blocks reach the last level than flat scores, and the picks
    # of tokens up to p do not move when the keys after p change (no bound mixes in a later key).
    q, k, _ = random_qkv(1, 300, 4096, 4, 2, 32)
    config = SSAConfig(block_size=BLOCK, top_k=3, index="beam", tree_group=4, tree_probe=2)
    sel = select_blocks(q, k, config)
    flat = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=3))
    assert 0.05 < routing_agreement(flat, sel) < 1.0
    position = 4096 - 300 + 120
    k2 = k.clone()
    k2[:, position + 1 :] = 3 * torch.randn_like(k2[:, position + 1 :])
    assert torch.equal(select_blocks(q, k2, config).block_idx[:, :, :121], sel.block_idx[:, :, :121])


def test_beam_cost_grows_with_the_level_2_nodes_only():
    config = SSAConfig(block_size=64, top_k=16, index="beam")
    costs = {n: beam_cost_per_query(n, config) for n in (1 << 14, 1 << 16, 196608)}
    # 1M, 4M and 12M tokens: the gathers stay 3 * 17 * 8 = 408; the level-2 bounds grow as N / 64.
    assert costs == {1 << 14: 2 * 256 + 408, 1 << 16: 2 * 1024 + 408, 196608: 2 * 3072 + 408}
    assert all(cost < n / 8 for n, cost in costs.items())


def test_beam_refuses_noncausal_attention():
    q, k, v = random_qkv(1, 40, 200, 4, 2, 16)
    with pytest.raises(ValueError, match="causal=False.*index='beam'"):
        ssa_attention(q, k, v, SSAConfig(block_size=BLOCK, top_k=2, index="beam"), causal=False)
