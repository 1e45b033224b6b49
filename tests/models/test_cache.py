"""SSACache: summaries kept equal to block_summaries, ragged rows, memory accounting."""

import pytest
import torch

import subquad
from subquad.cache import SSACacheLayer


def test_summaries_follow_appends(host_reads):
    layer = SSACacheLayer(block_size=16)
    keys = torch.randn(2, 100, 3, 8)
    values = torch.randn(2, 100, 3, 4)
    start = 0
    for n in (5, 11, 1, 1, 30, 17, 1, 35):
        with host_reads() as reads:  # a prefill chunk's append queues its work without a device sync
            layer.append(keys[:, start : start + n], values[:, start : start + n])
        assert reads.calls == [], n
        start += n
        torch.testing.assert_close(layer.summaries(), subquad.block_summaries(keys[:, :start], 16))
        torch.testing.assert_close(layer.keys_bshd(), keys[:, :start])
        torch.testing.assert_close(layer.values_bshd(), values[:, :start])
    assert layer.lengths == [100, 100]


def test_reserve_makes_room_up_front():
    cache = subquad.SSACache(subquad.SSAConfig(block_size=16), num_layers=2)
    keys = torch.randn(1, 70, 2, 8)
    cache.layer(0).append(keys[:, :20], keys[:, :20])
    cache.reserve(70)
    buffers = [cache.layer(0)._key_buf]
    cache.layer(1).append(keys[:, :20], keys[:, :20])  # allocated after reserve: takes it on first use
    buffers.append(cache.layer(1)._key_buf)
    for i in range(2):
        for start in range(20, 70, 7):
            cache.layer(i).append(keys[:, start : start + 7], keys[:, start : start + 7])
        assert cache.layer(i)._key_buf is buffers[i]  # never reallocated
        torch.testing.assert_close(cache.layer(i).summaries(), subquad.block_summaries(keys, 16))
    with pytest.raises(ValueError, match="max_length=-1"):
        cache.reserve(-1)


def test_ragged_rows_store_only_real_tokens():
    layer = SSACacheLayer(block_size=16)
    keys, values = torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :13] = False
    layer.append(keys, values, valid)
    assert layer.lengths == [40, 27]
    for _ in range(20):  # decode steps: one token per row, vectorised path
        k1, v1 = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
        keys, values = torch.cat([keys, k1], 1), torch.cat([values, v1], 1)
        layer.append(k1, v1)
    assert layer.lengths == [60, 47]
    assert layer.seqlens.tolist() == [60, 47]
    row1 = keys[1:, 13:]
    torch.testing.assert_close(layer.keys_bshd()[1:, :47], row1)
    nb = -(-47 // 16)
    torch.testing.assert_close(layer.summaries()[1:, :nb], subquad.block_summaries(row1, 16))
    torch.testing.assert_close(layer.summaries()[:1], subquad.block_summaries(keys[:1], 16))


def test_transformers_update_crop_and_reorder():
    cache = subquad.SSACache({"block_size": 16}, num_layers=2, max_length=8)
    k = torch.randn(3, 2, 50, 8)  # [B, H, T, D] as transformers passes it
    keys, values = cache.update(k, k + 1, layer_idx=0)
    assert keys.shape == (3, 2, 50, 8) and keys._subquad_cache_layer is cache.layers[0]
    torch.testing.assert_close(keys, k)
    assert cache.get_seq_length(0) == 50 and cache.get_mask_sizes(1, 0) == (51, 0)
    cache.crop(-7)
    assert cache.get_seq_length(0) == 43
    torch.testing.assert_close(
        cache.layers[0].summaries(), subquad.block_summaries(k[:, :, :43].transpose(1, 2), 16)
    )
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(cache.layers[0].keys_bshd(), k[[2, 0, 1], :, :43].transpose(1, 2))
    with pytest.raises(ValueError, match="tokens_to_remove=3"):
        cache.crop(3)


def test_bytes_per_token():
    cache = subquad.SSACache({"block_size": 64}, num_layers=3)
    for i in range(3):
        cache.update(
            torch.randn(1, 2, 10, 32, dtype=torch.bfloat16),
            torch.randn(1, 2, 10, 32, dtype=torch.bfloat16),
            i,
        )
    # Per layer: K and V (2 heads x 32 x 2 bytes each) + a 2 x 32 float32 summary shared by 64 tokens.
    assert cache.bytes_per_token() == pytest.approx(3 * (2 * 2 * 32 * 2 + 2 * 32 * 4 / 64))
    assert cache.memory_bytes() >= 3 * 10 * 2 * 2 * 32 * 2


def test_cache_arguments():
    with pytest.raises(ValueError, match="max_length=-1"):
        subquad.SSACache(max_length=-1)
    with pytest.raises(ValueError, match="unknown field"):
        subquad.SSACache({"blocksize": 16})


def test_device_lengths_follow_host_lengths_and_derived_state_is_cleared():
    # Equal-length appends leave the device lengths to be rebuilt on demand; ragged rows keep them.
    layer = SSACacheLayer(block_size=16)
    layer.append(torch.randn(2, 20, 2, 8), torch.randn(2, 20, 2, 8))
    layer.append(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    assert layer.seqlens.tolist() == layer.lengths == [21, 21]
    layer.derived["tree_bounds"] = object()
    layer.append(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    assert "tree_bounds" in layer.derived  # appends never change a complete block
    layer.crop(-5)
    assert layer.derived == {} and layer.seqlens.tolist() == [17, 17]
    valid = torch.tensor([[True, True, True], [False, True, True]])
    layer.append(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8), valid)
    layer.append(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    assert layer.seqlens.tolist() == layer.lengths == [21, 20]
