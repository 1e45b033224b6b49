"""``summary="max"``: a block scores as the best of its sub-blocks' mean keys.

Checked against brute force (explicit sub-block means and per-token candidate lists), through
attention, decoding and the KV cache, on the CPU reference path.
"""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad import SSAConfig, select_blocks, ssa_attention
from subquad.ops.ssa.select import block_scores, routing_summaries
from subquad.ops.ssa.triton_decode import ssa_decode

BLOCK = 16


def max_config(sub=4, **over):
    return SSAConfig(block_size=BLOCK, summary="max", sub_block_size=sub, **over)


def test_config_validation():
    with pytest.raises(ValueError, match="needs sub_block_size"):
        SSAConfig(block_size=BLOCK, summary="max")
    with pytest.raises(ValueError, match="sub_block_size=6"):
        SSAConfig(block_size=BLOCK, summary="max", sub_block_size=6)
    with pytest.raises(ValueError, match="sub_block_size=16: expected a power of two below block_size=16"):
        SSAConfig(block_size=BLOCK, summary="max", sub_block_size=16)
    with pytest.raises(ValueError, match="only summary='max' has sub-blocks"):
        SSAConfig(block_size=BLOCK, sub_block_size=4)
    with pytest.raises(ValueError, match="index='tree'"):
        SSAConfig(block_size=BLOCK, summary="max", sub_block_size=4, index="tree")
    with pytest.raises(TypeError, match="sub_block_size"):
        SSAConfig(block_size=BLOCK, summary="max", sub_block_size=4.0)
    with pytest.raises(ValueError, match="summary='median'"):
        SSAConfig(summary="median")
    config = max_config(sub=2)
    assert (config.summary_size, config.summaries_per_block) == (2, 8)
    assert (SSAConfig().summary_size, SSAConfig().summaries_per_block) == (64, 1)
    assert SSAConfig.from_dict(config.to_dict()) == config


def test_override_back_to_mean_drops_the_sub_blocks():
    saved = max_config(sub=4).to_dict()
    assert SSAConfig.from_dict(SSAConfig.override(saved, {"summary": "mean"})) == SSAConfig(block_size=BLOCK)
    assert SSAConfig.override(saved, {"top_k": 3})["sub_block_size"] == 4  # other changes keep them
    assert SSAConfig.override(saved, {"sub_block_size": 2}) == {**saved, "sub_block_size": 2}
    assert SSAConfig.override(None, {"top_k": 3}) == {"top_k": 3}


def test_block_scores_take_the_best_sub_block_of_each_block_partial_last_included():
    config = max_config(sub=4)  # 4 sub-blocks per block
    scores = torch.randn(2, 3, 10)  # 10 sub-blocks: 2 whole blocks and a last one holding 2
    got = block_scores(scores, config, num_blocks=3)
    want = torch.stack([scores[..., 0:4].amax(-1), scores[..., 4:8].amax(-1), scores[..., 8:10].amax(-1)], -1)
    assert torch.equal(got, want)
    assert torch.equal(block_scores(scores, SSAConfig(block_size=BLOCK), num_blocks=3), scores[..., :3])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("sub", [1, 4, 8])
def test_flat_router_is_exact_top_k_of_the_best_sub_block(sub, causal):
    batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim = 2, 57, 251, 8, 2, 32
    q = torch.randn(batch, seq_len_q, heads_q, dim)
    k = torch.randn(batch, seq_len_k, heads_kv, dim)
    config = max_config(sub=sub, top_k=3)
    sel = select_blocks(q, k, config, causal=causal)
    nb = -(-seq_len_k // BLOCK)
    routing_q = q.view(batch, seq_len_q, heads_kv, heads_q // heads_kv, dim).sum(3)
    # Brute force: every block's sub-blocks (the last block's partial one too) and their mean keys.
    block_score = torch.full((batch, heads_kv, seq_len_q, nb), float("-inf"))
    for j in range(nb):
        for s in range(j * BLOCK, min((j + 1) * BLOCK, seq_len_k), sub):
            mean = k[:, s : min(s + sub, seq_len_k)].mean(1)  # [B, Hkv, D]
            score = torch.einsum("bthd,bhd->bht", routing_q, mean)
            block_score[..., j] = torch.maximum(block_score[..., j], score)
    qblocks = (torch.arange(seq_len_q) + seq_len_k - seq_len_q) // BLOCK
    for t in range(seq_len_q):
        qb = int(qblocks[t])
        blocks = torch.arange(nb)
        ok = (blocks >= config.sink_blocks) & (blocks <= qb - config.local_blocks)
        if not causal:
            ok |= (blocks >= config.sink_blocks) & (blocks > qb)
        candidates = blocks[ok]
        for b in range(batch):
            for h in range(heads_kv):
                best = candidates[block_score[b, h, t, candidates].topk(min(3, len(candidates))).indices]
                assert set(sel.block_idx[b, h, t, -3:].tolist()) - {-1} == set(best.tolist())


def test_one_distinctive_sub_block_is_routed_where_the_block_mean_misses_it():
    torch.manual_seed(0)
    batch, seq_len, heads_kv, dim = 1, 640, 1, 64
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    q = 0.3 * torch.randn(batch, 16, 2, dim) + 3 * direction
    k = 0.5 * torch.randn(batch, seq_len, heads_kv, dim)
    v = torch.randn(batch, seq_len, heads_kv, dim)
    # Block 7: one sub-block of four keys points along the queries (block mean 1.5 along them);
    # block 20: all 16 keys, less (mean 2.5).
    k[:, 7 * BLOCK + 4 : 7 * BLOCK + 8] += 6 * direction
    k[:, 20 * BLOCK : 21 * BLOCK] += 2.5 * direction
    mean_sel = select_blocks(q, k, SSAConfig(block_size=BLOCK, top_k=1))
    out, max_sel = ssa_attention(q, k, v, max_config(sub=4, top_k=1), return_selection=True)
    assert (mean_sel.block_idx[..., -1] == 20).all()
    assert (max_sel.block_idx[..., -1] == 7).all()
    # Attention itself does not depend on how the selection was made.
    masked = ssa_attention(q, k, v, SSAConfig(block_size=BLOCK, top_k=1), selection=max_sel)
    torch.testing.assert_close(out, masked)


def test_precomputed_summaries_are_sub_block_means_and_block_means_are_refused():
    q, k, v = torch.randn(1, 30, 4, 16), torch.randn(1, 150, 2, 16), torch.randn(1, 150, 2, 16)
    config = max_config(sub=4, top_k=2)
    summaries = routing_summaries(k, config)
    assert summaries.shape == (1, 38, 2, 16)
    torch.testing.assert_close(summaries, subquad.block_summaries(k, 4))
    want = ssa_attention(q, k, v, config)
    torch.testing.assert_close(ssa_attention(q, k, v, config, summaries=summaries), want)
    with pytest.raises(ValueError, match=r"summaries: got \(1, 10, 2, 16\), expected shape \(1, 38, 2, 16\)"):
        ssa_attention(q, k, v, config, summaries=subquad.block_summaries(k, BLOCK))


@pytest.mark.parametrize("seq_len, heads", [(1, (4, 4)), (63, (4, 1)), (161, (8, 2))])
def test_decode_equals_last_token_of_full_attention(seq_len, heads):
    config = max_config(sub=4, top_k=3)
    q = torch.randn(2, 1, heads[0], 32)
    k, v = torch.randn(2, seq_len, heads[1], 32), torch.randn(2, seq_len, heads[1], 24)
    ref, sel = ssa_attention(q, k, v, config=config, return_selection=True)
    out, idx = ssa_decode(q, k, v, config, return_selection=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(idx.sort(-1).values, sel.block_idx[:, :, 0].sort(-1).values)


def test_decode_rows_of_different_lengths_from_a_cache():
    config = max_config(sub=8, top_k=2)
    lengths = [200, 77, 16]
    cache = subquad.SSACache(config).layer(0)
    k, v = torch.randn(3, 200, 2, 32), torch.randn(3, 200, 2, 32)
    valid = torch.arange(200)[None, :] < torch.tensor(lengths)[:, None]
    cache.append(k, v, valid)
    for row, n in enumerate(lengths):
        own = cache.summaries()[row : row + 1, : -(-n // 8)]
        torch.testing.assert_close(own, subquad.block_summaries(k[row : row + 1, :n], 8))
    q = torch.randn(3, 1, 4, 32)
    out = ssa_decode(q, cache.keys_bshd(), cache.values_bshd(), config, cache.seqlens, cache.summaries())
    for row, n in enumerate(lengths):
        ref = ssa_attention(q[row : row + 1], k[row : row + 1, :n], v[row : row + 1, :n], config=config)
        torch.testing.assert_close(out[row : row + 1], ref)
    with pytest.raises(ValueError, match=r"expected \[3, >= 25, 2, 32\] \(a summary per 8 keys\)"):
        ssa_decode(q, cache.keys_bshd(), cache.values_bshd(), config, cache.seqlens, cache.summaries()[:, :3])


def test_decode_select_without_a_plan_equals_the_full_router():
    from subquad.ops.ssa.triton_decode import decode_select

    config = max_config(sub=4, top_k=3)
    q, k = torch.randn(1, 1, 4, 32), torch.randn(1, 150, 2, 32)
    summaries = routing_summaries(k, config)  # 38 summaries of 10 blocks
    got = decode_select(q[:, 0], summaries, torch.tensor([150]), config)
    assert got.shape == (1, 2, config.blocks_per_query)
    want = select_blocks(q, k, config).block_idx[:, :, 0]
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
