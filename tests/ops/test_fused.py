"""The inference kernels of ``subquad.ops.fused`` against their PyTorch references.

On machines without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py), fp16 and
fp32 there (the interpreter mishandles bf16 storage); on a GPU bf16 too. ``poison_empty`` NaN-fills
every ``torch.empty`` so an element the kernel never writes fails.
"""

import pytest
import torch

from subquad.models.subquad.modeling import SubquadRotary
from subquad.ops import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 1, 768), (7, 33)])
def test_rms_norm_matches_reference(shape, dtype, poison_empty):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], device=DEVICE) / 4).to(dtype)
    want = fused.rms_norm_reference(x, weight, 1e-6)
    got = fused.rms_norm_triton(x, weight, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Sums in another order: at most a last-bit difference in the normalised value, before the weight.
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_rms_norm_takes_a_float32_weight_and_strided_rows(poison_empty):
    x = torch.randn(4, 6, 40, device=DEVICE, dtype=torch.float16)[:, ::2]  # rows not contiguous
    weight = torch.randn(40, device=DEVICE)
    got = fused.rms_norm_triton(x, weight, 1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fused.rms_norm_reference(x, weight, 1e-5), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm_triton(x, weight[:39], 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,table_batch,table_heads",
    [((2, 5, 3, 18), 1, 1), ((1, 1, 12, 64), 1, 1), ((3, 4, 2, 32), 3, 2), ((2, 7, 5, 128), 2, 1)],
)
def test_rotate_matches_reference_to_the_bit(shape, table_batch, table_heads, dtype, poison_empty):
    batch, steps, heads, dim = shape
    x = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    positions = torch.randint(0, 100_000, (table_batch, steps, table_heads), device=DEVICE)
    cos, sin = SubquadRotary(dim, 10_000.0).tables(positions)
    got = fused.rotate_triton(x, cos, sin)
    assert got.dtype == dtype
    assert torch.equal(got, fused.rotate_reference(x, cos, sin))


def test_rotate_validates_its_tables():
    x = torch.randn(1, 3, 2, 8, device=DEVICE)
    cos, sin = SubquadRotary(8, 10_000.0).tables(torch.arange(3, device=DEVICE)[None, :, None])
    with pytest.raises(ValueError, match="cos, sin"):
        fused.rotate_triton(x, cos[..., :4], sin[..., :4])
    with pytest.raises(ValueError, match="cos, sin"):
        fused.rotate_triton(x, cos.double(), sin.double())
    with pytest.raises(ValueError, match="even D"):
        fused.rotate_triton(x[..., :7], cos, sin)


def test_training_and_cpu_keep_the_pytorch_ops():
    """Gradients flow through the references (the kernels have no backward)."""
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE, requires_grad=True)
    fused.rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and weight.grad is not None
    q = torch.randn(1, 3, 2, 16, device=DEVICE, requires_grad=True)
    cos, sin = SubquadRotary(16, 10_000.0).tables(torch.arange(3, device=DEVICE)[None, :, None])
    fused.rotate(q, cos, sin).square().sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 1, 2816), (7, 33)])
def test_silu_mul_matches_reference(shape, dtype, poison_empty):
    # gate and up as the halves of one projection's output, as the graphed decode step passes them.
    both = (torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE) * 3).to(dtype)
    gate, up = both[..., : shape[-1]], both[..., shape[-1] :]
    want = fused.silu_mul_reference(gate, up)
    got = fused.silu_mul_triton(gate, up)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    # One rounding step of the dtype at most (the exponential's last bit can flip the silu's rounding).
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 0.1)


def test_silu_mul_validates_and_keeps_autograd():
    gate = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="gate, up"):
        fused.silu_mul_triton(gate, gate[:, :7])
    with pytest.raises(ValueError, match="gate, up"):
        fused.silu_mul_triton(gate, gate.half())
    gate.requires_grad_(True)
    fused.silu_mul(gate, torch.randn(2, 8, device=DEVICE)).sum().backward()
    assert gate.grad is not None


def _cache_buffers(batch, capacity, heads, dim, dim_v, block_size, held, dtype):
    """Buffers as a cache layer holds them: ``held`` tokens written, zeros after, block means of them."""
    keys = torch.randn(batch, capacity, heads, dim, device=DEVICE).to(dtype)
    values = torch.randn(batch, capacity, heads, dim_v, device=DEVICE).to(dtype)
    keys[:, held:], values[:, held:] = 0, 0
    blocks = -(-capacity // block_size)
    padded = torch.zeros(batch, blocks * block_size, heads, dim, device=DEVICE)
    padded[:, :capacity] = keys.float()
    counts = (held - torch.arange(blocks, device=DEVICE) * block_size).clamp(1, block_size)
    means = padded.view(batch, blocks, block_size, heads, dim).sum(2) / counts.float().view(1, -1, 1, 1)
    return keys, values, means


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,heads_q,heads_kv,dim,block_size,held",
    [(1, 4, 2, 64, 16, 0), (2, 3, 3, 24, 16, 37), (3, 5, 1, 128, 64, 63), (1, 6, 2, 16, 8, 40)],
)
def test_rotate_append_decode_token_matches_reference(
    batch, heads_q, heads_kv, dim, block_size, held, dtype, poison_empty
):
    # held = 0, 37: a new block opened / one partly full; 63: the token fills its block; 40 with
    # block 8: it opens one. The buffers are a slice of longer ones (strided rows), qkv a view of a
    # wider projection output; the tables are the model's for the token's key block.
    capacity = (held // block_size + 2) * block_size
    bufs = _cache_buffers(batch, capacity + 8, heads_kv, dim, dim, block_size, held, dtype)
    key_buf, value_buf, means = bufs[0][:, :capacity], bufs[1][:, :capacity], bufs[2]
    width = heads_q + 2 * heads_kv
    qkv = torch.randn(batch, 1, width + 1, dim, device=DEVICE).to(dtype)[:, :, 1:]
    first = held // block_size * block_size
    cos, sin = SubquadRotary(dim, 10_000.0).tables(torch.arange(first, first + block_size, device=DEVICE))
    pos = torch.tensor([held], device=DEVICE)
    want = [t.clone() for t in (key_buf, value_buf, means)]
    want_q = fused.rotate_append_decode_token_reference(qkv, cos, sin, pos, *want)
    got_q = fused.rotate_append_decode_token_triton(qkv, cos, sin, pos, key_buf, value_buf, means)
    # The rotation as the model's: its tables at the token's own position.
    own_cos, own_sin = SubquadRotary(dim, 10_000.0).tables(pos.view(1, 1, 1))
    rotated = fused.rotate_reference(qkv[:, :, : heads_q + heads_kv], own_cos, own_sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_q, rotated[:, :, :heads_q])
    assert torch.equal(key_buf, want[0]) and torch.equal(value_buf, want[1])
    assert torch.equal(key_buf[:, held], rotated[:, 0, heads_q:])
    assert torch.equal(value_buf[:, held], qkv[:, 0, heads_q + heads_kv :])
    torch.testing.assert_close(means, want[2], rtol=1e-5, atol=1e-6)
    block = held // block_size
    expected = key_buf[:, block * block_size : held + 1].float().mean(1)
    torch.testing.assert_close(means[:, block], expected, rtol=1e-5, atol=1e-6)


def test_rotate_append_decode_token_validates():
    key_buf, value_buf, means = _cache_buffers(1, 32, 2, 16, 16, 16, 5, torch.float32)
    qkv = torch.randn(1, 1, 8, 16, device=DEVICE)
    cos, sin = SubquadRotary(16, 10_000.0).tables(torch.arange(16, device=DEVICE))
    pos = torch.tensor([5], device=DEVICE)
    args = [qkv, cos, sin, pos, key_buf, value_buf, means]
    for index, bad, match in [
        (0, qkv[:, :, :7], "qkv"),  # 3 query heads for 2 KV heads
        (0, qkv.half(), "qkv"),
        (1, cos[:, :8], "cos"),
        (2, sin.double(), "sin"),
        (3, pos.int(), "pos"),
        (3, torch.tensor([5, 6], device=DEVICE), "pos"),
        (5, value_buf[..., :8], "value_buf"),
        (6, means[:, :1], "means"),
    ]:
        with pytest.raises(ValueError, match=match):
            fused.rotate_append_decode_token_triton(*args[:index], bad, *args[index + 1 :])


# (rows, K, N), odd sizes: weights loaded before the PDL wait in one to three power-of-two tiles (K 256;
# 768; 100), three tiles short of K (1000: 896 columns, then one chunk), the prefetch capped (K 4500:
# 3072 columns, then 6 chunks; 2200: 2192, then a chunk of 8)
GEMV_SHAPES = [
    (1, 100, 37), (3, 768, 1000), (2, 130, 2100), (1, 2200, 24), (2, 256, 45), (1, 4500, 9), (2, 1000, 33)
]  # fmt: skip


def test_gemv_prefetch_tiles():
    # Powers of two, largest first, at most three, within the budget: `small`'s K (768, 2816) whole.
    assert fused._prefetch_tiles(768, 1536) == [512, 256, 0]
    assert fused._prefetch_tiles(2816, 3072) == [2048, 512, 256]
    assert fused._prefetch_tiles(1000, 3072) == [512, 256, 128]
    assert fused._prefetch_tiles(4500, 3072) == [2048, 1024, 0]
    assert fused._prefetch_tiles(37, 3072) == [32, 4, 1]


def _gemv_inputs(rows, k_in, n_out, dtype, in_width=None):
    x = torch.randn(rows, in_width or k_in, device=DEVICE).to(dtype)
    weight = (torch.randn(n_out, k_in, device=DEVICE) / k_in**0.5).to(dtype)
    return x, weight


def _close(got, want, dtype):
    # Products summed in another order, in float32: up to one rounding of the output dtype, relative
    # to the largest output (sums of K terms cancel).
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k_in,n_out", GEMV_SHAPES)
def test_norm_linear_matches_reference(rows, k_in, n_out, dtype, poison_empty):
    x, weight = _gemv_inputs(rows, k_in, n_out, dtype)
    x = x * 3
    norm_weight = (1 + torch.randn(k_in, device=DEVICE) / 4).to(dtype)
    want = fused.norm_linear_reference(x, norm_weight, 1e-6, weight)
    got = fused.norm_linear_triton(x, norm_weight, 1e-6, weight)
    assert got.dtype == dtype and got.shape == (rows, n_out)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k_in,n_out", GEMV_SHAPES[:4])
def test_embed_norm_linear_matches_reference(rows, k_in, n_out, dtype, poison_empty):
    table, weight = _gemv_inputs(37, k_in, n_out, dtype)
    table = table * 3
    norm_weight = (1 + torch.randn(k_in, device=DEVICE) / 4).to(dtype)
    ids = torch.randint(0, 37, (rows,), device=DEVICE)
    want_residual = torch.full((rows, k_in), float("nan"), device=DEVICE).to(dtype)
    want = fused.embed_norm_linear_reference(ids, table, want_residual, norm_weight, 1e-6, weight)
    residual = torch.full((rows, k_in), float("nan"), device=DEVICE).to(dtype)
    got = fused.embed_norm_linear_triton(ids, table, residual, norm_weight, 1e-6, weight)
    assert got.dtype == dtype and got.shape == (rows, n_out)
    assert torch.equal(residual, table[ids])  # copied whole, by the rows' first programs
    _close(got, want, dtype)


def test_embed_norm_linear_poisons_an_id_out_of_range():
    table, weight = _gemv_inputs(11, 40, 24, torch.float32)
    norm_weight = torch.ones(40, device=DEVICE)
    residual = torch.zeros(3, 40, device=DEVICE)
    ids = torch.tensor([2, 11, -1], device=DEVICE)
    got = fused.embed_norm_linear_triton(ids, table, residual, norm_weight, 1e-6, weight)
    want = fused.norm_linear_reference(table[2:3], norm_weight, 1e-6, weight)
    _close(got[:1], want, torch.float32)
    assert got[1:].isnan().all()


def test_norm_linear_advances_counters_once():
    x, weight = _gemv_inputs(3, 130, 2100, torch.float32)  # 2 x 525 programs, one advances
    norm_weight = 1 + torch.randn(130, device=DEVICE) / 4
    pos = torch.tensor([41], device=DEVICE)
    lengths = torch.tensor([42, 42, 42], device=DEVICE, dtype=torch.int32)
    got = fused.norm_linear_triton(x, norm_weight, 1e-6, weight, advance=(pos, lengths))
    _close(got, fused.norm_linear_reference(x, norm_weight, 1e-6, weight), torch.float32)
    assert pos.tolist() == [42] and lengths.tolist() == [43, 43, 43]
    pos, lengths = pos.cpu(), lengths.cpu()
    fused.norm_linear(x.cpu(), norm_weight.cpu(), 1e-6, weight.cpu(), advance=(pos, lengths))  # reference
    assert pos.tolist() == [43] and lengths.tolist() == [44, 44, 44]
    with pytest.raises(ValueError, match="advance"):
        fused.norm_linear(x.cpu(), norm_weight.cpu(), 1e-6, weight.cpu(), advance=(pos, lengths.long()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k_in,n_out", GEMV_SHAPES)
def test_linear_add_matches_reference(rows, k_in, n_out, dtype):
    x, weight = _gemv_inputs(rows, k_in, n_out, dtype)
    residual = torch.randn(rows, n_out + 5, device=DEVICE).to(dtype)[:, :n_out]  # strided rows
    want = fused.linear_add_reference(residual.clone(), x, weight)
    got = fused.linear_add_triton(residual, x, weight)
    assert got is residual
    _close(residual, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k_in,n_out", GEMV_SHAPES)
def test_swiglu_linear_add_matches_reference(rows, k_in, n_out, dtype):
    gate_up, weight = _gemv_inputs(rows, k_in, n_out, dtype, in_width=2 * k_in)
    gate_up = gate_up * 2
    residual = torch.randn(rows, n_out, device=DEVICE).to(dtype)
    want = fused.swiglu_linear_add_reference(residual.clone(), gate_up, weight)
    fused.swiglu_linear_add_triton(residual, gate_up, weight)
    _close(residual, want, dtype)


def test_gemv_kernels_validate():
    x, weight = _gemv_inputs(2, 16, 8, torch.float32)
    norm_weight = torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        fused.norm_linear_triton(x, norm_weight, 1e-6, weight[:, :15])
    with pytest.raises(ValueError, match="weight"):
        fused.norm_linear_triton(x, norm_weight, 1e-6, weight.half())
    with pytest.raises(ValueError, match="norm_weight"):
        fused.norm_linear_triton(x, norm_weight[:15], 1e-6, weight)
    with pytest.raises(ValueError, match="x, weight"):
        fused.norm_linear_triton(x[None], norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="residual"):
        fused.linear_add_triton(torch.zeros(2, 7, device=DEVICE), x, weight)
    with pytest.raises(ValueError, match="advance"):
        fused.norm_linear_triton(x, norm_weight, 1e-6, weight, advance=(torch.zeros(1, device=DEVICE),) * 2)
    two_ids = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="ids"):
        fused.embed_norm_linear_triton(two_ids.int(), x, x.clone(), norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="residual"):
        fused.embed_norm_linear_triton(two_ids, x, x[:, :8], norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="gate_up"):
        fused.swiglu_linear_add_triton(torch.zeros(2, 8, device=DEVICE), x[:, :15], weight)
    with pytest.raises(ValueError, match="weight"):
        fused.swiglu_linear_add_triton(torch.zeros(2, 8, device=DEVICE), x, weight)
