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
