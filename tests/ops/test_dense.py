"""dense_attention (the oracle) against the textbook full-matrix formula and torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subquad.ops.dense as dense_module
from subquad import dense_attention

# (batch, seq_len_q, seq_len_k, heads_q, heads_kv, head_dim, head_dim_v)
SHAPES = [
    (1, 63, 63, 4, 1, 64, 64),
    (2, 17, 17, 2, 2, 32, 32),
    (1, 1000, 1000, 8, 1, 64, 64),
    (2, 37, 101, 8, 2, 128, 128),
    (1, 1, 257, 4, 4, 64, 64),
    (1, 33, 90, 4, 1, 48, 24),
]


def shape_id(shape):
    b, t, s, hq, hkv, d, dv = shape
    return f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}" + (f"-Dv{dv}" if dv != d else "")


def random_qkv(batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim, dim_v, dtype=torch.float32):
    q = torch.randn(batch, seq_len_q, heads_q, dim).to(dtype)
    k = torch.randn(batch, seq_len_k, heads_kv, dim).to(dtype)
    v = torch.randn(batch, seq_len_k, heads_kv, dim_v).to(dtype)
    return q, k, v


def sdpa_reference(q, k, v, causal):
    """torch SDPA (math on CPU) with GQA; bottom-right causal mask passed explicitly."""
    seq_len_q, seq_len_k = q.shape[1], k.shape[1]
    mask = None
    if causal:
        query_pos = torch.arange(seq_len_q) + (seq_len_k - seq_len_q)
        mask = torch.arange(seq_len_k)[None, :] <= query_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dense_matches_full_matrix(shape, causal, reference):
    q, k, v = random_qkv(*shape)
    out = dense_attention(q, k, v, causal=causal)
    assert out.shape == (shape[0], shape[1], shape[3], shape[6])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=causal), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] == s[6]], ids=shape_id)
def test_dense_matches_sdpa_gqa(shape, causal):
    q, k, v = random_qkv(*shape)
    torch.testing.assert_close(dense_attention(q, k, v, causal=causal), sdpa_reference(q, k, v, causal))


def test_dense_square_causal_matches_sdpa_is_causal():
    q, k, v = random_qkv(2, 63, 63, 8, 2, 64, 64)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(dense_attention(q, k, v), expected)


def test_dense_bottom_right_alignment_is_chunked_prefill():
    # The last T queries of a full causal pass equal a T-query call over all S keys (bottom-right).
    q, k, v = random_qkv(1, 90, 90, 4, 2, 32, 32)
    full = dense_attention(q, k, v)
    for seq_len_q in (1, 7, 40):
        tail = dense_attention(q[:, -seq_len_q:], k, v)
        torch.testing.assert_close(tail, full[:, -seq_len_q:], atol=1e-6, rtol=1e-5)


def test_dense_causal_row_sees_exactly_its_prefix():
    q, k, v = random_qkv(1, 10, 30, 2, 1, 16, 16)
    out = dense_attention(q, k, v)
    row = 4  # absolute position 30 - 10 + 4 = 24
    k2, v2 = k.clone(), v.clone()
    k2[:, 25:] += 3.0
    v2[:, 25:] -= 3.0
    out_future = dense_attention(q, k2, v2)
    torch.testing.assert_close(out_future[:, : row + 1], out[:, : row + 1], atol=0, rtol=0)
    v3 = v.clone()
    v3[:, 24] += 3.0
    assert not torch.allclose(dense_attention(q, k, v3)[:, row], out[:, row])


def test_dense_noncausal_more_queries_than_keys(reference):
    q, k, v = random_qkv(2, 50, 21, 4, 2, 16, 16)
    torch.testing.assert_close(
        dense_attention(q, k, v, causal=False), reference.attention(q, k, v, causal=False)
    )


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_dense_custom_scale(scale, reference):
    q, k, v = random_qkv(1, 40, 40, 4, 2, 16, 16)
    out = dense_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, reference.attention(q, k, v, scale=scale), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(out, dense_attention(q, k, v))


def test_dense_chunked_equals_unchunked(monkeypatch, reference):
    q, k, v = random_qkv(2, 77, 120, 8, 2, 16, 16)
    # A few queries per chunk: exercises the chunk loop and its bottom-right offsets.
    monkeypatch.setattr(dense_module, "_CHUNK_ELEMENTS", 2 * 8 * 120 * 5)
    torch.testing.assert_close(dense_attention(q, k, v), reference.attention(q, k, v), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_low_precision(dtype, reference):
    q, k, v = random_qkv(1, 100, 130, 8, 2, 64, 64, dtype=dtype)
    out = dense_attention(q, k, v)
    assert out.dtype == dtype
    exact = reference.attention(q, k, v)
    low = reference.attention(q, k, v, upcast=False)
    assert (out.float() - exact).abs().max() <= 2 * (low.float() - exact).abs().max() + 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_dense_gradients(causal, reference):
    q, k, v = random_qkv(1, 45, 70, 8, 2, 32, 16)
    grad_out = torch.randn(1, 45, 8, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(dense_attention(*leaves, causal=causal), leaves, grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference.attention(*ref_leaves, causal=causal), ref_leaves, grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_dense_under_poisoned_empty(poison_empty, reference):
    q, k, v = random_qkv(1, 31, 31, 4, 1, 16, 16)
    assert torch.empty(3).isnan().all()
    out = dense_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=2e-6, rtol=1e-5)
