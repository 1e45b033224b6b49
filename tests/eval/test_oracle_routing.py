"""scripts/oracle_routing.py: the oracle router picks the blocks with the most dense attention mass."""

import torch

import subquad


def test_oracle_picks_the_blocks_with_most_dense_mass(load_script):
    oracle = load_script("scripts/oracle_routing.py")
    torch.manual_seed(5)
    config = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2)
    seq_len, heads_q, heads_kv, dim, scale = 150, 4, 2, 8, 0.4
    q = torch.randn(1, seq_len, heads_q, dim)
    k = torch.randn(1, seq_len, heads_kv, dim)
    got = oracle.oracle_routed_blocks(q, k, config, scale)  # [1, Hkv, T, top_k]
    assert got.shape == (1, heads_kv, seq_len, config.top_k)
    group = heads_q // heads_kv
    for t in (47, 48, 100, 149):  # tokens with fewer and more candidates than top_k
        last = t // 16 - config.local_blocks  # last candidate block
        candidates = list(range(config.sink_blocks, last + 1))
        for h in range(heads_kv):
            keys = k[0, 16 : (last + 1) * 16, h]  # candidate keys only
            mass = torch.zeros(len(candidates))
            for g in range(group):
                p = torch.softmax(q[0, t, h * group + g] @ keys.T * scale, dim=-1)
                mass += p.view(len(candidates), 16).sum(-1) / group
            want = [candidates[i] for i in mass.argsort(descending=True)[: config.top_k].tolist()]
            picked = [b for b in got[0, h, t].tolist() if b >= 0]
            assert picked == want, (t, h)
            assert (got[0, h, t] == -1).sum() == config.top_k - len(want)
