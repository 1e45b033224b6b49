"""scripts/needle_routing.py and scripts/routing_rules.py: block ranks recomputed from the dumped
token scores agree with the router's own, under mean and best-sub-block scoring; the attention
shares are what the layer's sparse attention reads."""

import math

import pytest
import torch

import subquad
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.ops.ssa.select import block_scores, block_summaries


@pytest.mark.parametrize("router", ["shared", "learned"])
def test_dumped_scores_rank_the_needle_as_the_router_does(load_script, router):
    routing = load_script("scripts/needle_routing.py")
    rules = load_script("scripts/routing_rules.py")
    torch.manual_seed(3)
    config = SubquadConfig.from_flavor("debug", router=router)  # block 16, top_k 2, 1 sink, 2 local
    model = SubquadForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, 301))
    dump = []
    result = routing.block_ranks(model, ids, target_token=101, sub_blocks=(4,), dump=dump)
    ssa = config.ssa_config
    meta = {"needle_token": 101, "block_size": ssa.block_size, "sink_blocks": ssa.sink_blocks,
            "top_k": ssa.top_k}  # fmt: skip
    assert len(dump) == len(result["layers"]) == config.num_hidden_layers
    for row, layer in zip(result["layers"], dump):
        # Keys of the complete blocks before the last token's local window: 300 // 16 - 2 + 1 = 17 blocks.
        assert layer["token_scores"].shape == (config.num_key_value_heads, 17 * ssa.block_size)
        assert rules.layer_rank("mean", layer["token_scores"], meta) == (min(row["rank"]), row["selected"])
        assert rules.layer_rank("max4", layer["token_scores"], meta)[0] == min(row["rank_max4"])


def test_rules_match_the_routers_block_scores(load_script):
    rules = load_script("scripts/routing_rules.py")
    torch.manual_seed(0)
    block, heads = 16, 2
    token_scores = torch.randn(heads, 7 * block) * 3
    keys_mean = token_scores.view(heads, 7, block).mean(-1)
    assert torch.allclose(rules.rule_scores("mean", token_scores, block), keys_mean, atol=1e-6)
    config = subquad.SSAConfig(block_size=block, top_k=2, summary="max", sub_block_size=4)
    # The router's max: sub-block means (block_summaries of the scores as 1-dim "keys"), best per block.
    sub_means = block_summaries(token_scores.T[None, :, :, None], 4)[0, :, :, 0].T  # [H, 28]
    want = block_scores(sub_means, config, 7)
    assert torch.allclose(rules.rule_scores("max4", token_scores, block), want, atol=1e-6)
    # The soft maximum runs from max (cold) to mean (hot).
    cold = rules.rule_scores("lse4@0.001", token_scores, block)
    hot = rules.rule_scores("lse4@1000", token_scores, block)
    assert torch.allclose(cold, want, atol=1e-2) and torch.allclose(hot, keys_mean, atol=1e-2)
    with pytest.raises(ValueError, match="rule 'median'"):
        rules.rule_scores("median", token_scores, block)
    with pytest.raises(ValueError, match="sub-block size 3: expected a divisor of the block size 16"):
        rules.rule_scores("max3", token_scores, block)


def test_mix_routes_by_either_half_of_the_budget(load_script):
    rules = load_script("scripts/routing_rules.py")
    block = 8
    # 9 candidate blocks after one sink; the needle block 5 has one high 4-key half and a lower mean.
    token_scores = torch.zeros(1, 10 * block)
    token_scores[0, 5 * block : 5 * block + 4] = 10.0
    token_scores[0, 5 * block + 4 : 6 * block] = -9.0
    for b in (2, 3, 4, 6):
        token_scores[0, b * block : (b + 1) * block] = 1.0  # higher means, lower maxima
    meta = {"needle_token": 5 * block + 2, "block_size": block, "sink_blocks": 1, "top_k": 2}
    assert rules.layer_rank("mean", token_scores, meta) == (5, False)
    assert rules.layer_rank("max4", token_scores, meta) == (1, True)
    assert rules.layer_rank("mix4", token_scores, meta) == (1, True)  # its max half takes it
    token_scores[0, 7 * block : 7 * block + 4] = 11.0  # a block with a higher half takes the max half
    assert rules.layer_rank("mix4", token_scores, meta) == (None, False)
    assert math.isclose(rules.rule_scores("max1", token_scores, block)[0, 7].item(), 11.0)


@pytest.mark.parametrize("position_scheme", ["local_rope", "rope"])
def test_attention_shares_are_what_the_sparse_attention_reads(load_script, position_scheme):
    """Values that are 1 on some keys and 0 elsewhere: the layer's own sparse attention then outputs
    exactly those keys' share of its softmax (the needle block's, the sink block's)."""
    from subquad.models.sparse_torch import sparse_attention_torch

    routing = load_script("scripts/needle_routing.py")
    torch.manual_seed(4)
    config = SubquadConfig.from_flavor("debug", position_scheme=position_scheme)
    attention = SubquadForCausalLM(config).eval().model.layers[1].self_attn
    ssa = config.ssa_config
    heads, heads_kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k = torch.randn(1, 203, heads, dim), torch.randn(1, 203, heads_kv, dim)
    selected = attention.select(q[:, -1:], k).block_idx
    rotary = (
        (attention.rotary, ssa.sink_blocks, ssa.local_blocks) if position_scheme == "local_rope" else None
    )

    def read(blocks):  # share of these blocks' keys in the sparse attention, per KV head
        v = torch.zeros(1, 203, heads_kv, dim)
        for block in blocks:
            v[:, block * 16 : (block + 1) * 16, :, 0] = 1.0
        out = sparse_attention_torch(q[:, -1:], k, v, selected, 16, attention.scale, local_rotary=rotary)
        return out[0, 0, :, 0].view(heads_kv, -1).mean(-1)

    for target in (selected[0, 0, 0, -1].item(), 203 // 16):  # a routed block, the last (local) block
        shares = {
            kind: torch.tensor(v)
            for kind, v in routing.attention_shares(attention, q, k, selected, target).items()
        }
        assert torch.allclose(sum(shares.values()), torch.ones(heads_kv), atol=1e-5)
        assert torch.allclose(shares["needle"], read([target]), atol=1e-5)
        assert torch.allclose(shares["sink"], read([0]), atol=1e-5)
        assert torch.allclose(
            shares["local"] + shares["needle"] * (target == 203 // 16), read([11, 12]), atol=1e-5
        )
        assert 0.0 < shares["needle"].max() < 1.0  # head 0 attends the block (and others)
