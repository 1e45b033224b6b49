"""RMSNorm and rotary embedding for inference, one Triton launch each.

In PyTorch a model's RMSNorm is about eight elementwise kernels (cast, square, mean, add, rsqrt,
product, cast, weight) and a rotary embedding about six per tensor, each with float32 temporaries
the size of its input. In a decode step those launches were most of the step (~650 kernels for the
12-layer ``small`` model, whose attention was ~0.3 of its 1.58 ms at 1M tokens; 1.05 ms with these
kernels, ``benchmarks/NOTES.md`` item 40), and in a long prefill they are memory passes. Here each is
one kernel reading its input once.

The ``*_reference`` functions are the PyTorch definitions (the model's own math) and what
:func:`rms_norm` and :func:`rotate` run wherever the kernels do not apply: on the CPU, and when a
gradient is needed (training keeps the autograd ops, which ``torch.compile`` fuses there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, the norm in float32 and cast back
    to ``x.dtype`` before the weight (Llama's order); the result has ``weight``'s and ``x``'s
    promoted dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [..., D]`` by float32 tables ``cos = [c, c]``, ``sin = [-s, s]``
    (broadcastable to ``x``): ``x * cos + [x2, x1] * sin`` in float32, cast back to ``x.dtype``."""
    half = x.shape[-1] // 2
    xf = x.float()
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + swapped * sin).to(x.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@triton.jit
def _rms_norm_kernel(X, W, OUT, n_cols, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=ok, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(OUT + row * n_cols + cols, out.to(OUT.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: :func:`rms_norm_triton` on CUDA without gradients, else :func:`rms_norm_reference`."""
    if x.is_cuda and not _needs_grad(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_reference` in one kernel (one program per row; float32 sums in another order,
    so an output may differ from the reference's by its last bit)."""
    cols = x.shape[-1]
    if weight.shape != (cols,):
        raise ValueError(
            f"weight: shape {tuple(weight.shape)}, expected ({cols},) for x of shape {tuple(x.shape)}"
        )
    rows = x.reshape(-1, cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(cols)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, cols, rows.stride(0), eps,
            BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out


@triton.jit
def _rotate_kernel(X, COS, SIN, OUT, T, H, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                   stride_ch, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (row, token): all its heads. The tables broadcast over heads (stride_ch = 0) or not.
    bt = tl.program_id(0)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    ok = (heads < H) & (d < D)
    x_row = X + b * stride_xb + t * stride_xt + heads * stride_xh
    x = tl.load(x_row + d, mask=ok, other=0.0).to(tl.float32)
    swapped = tl.load(x_row + partner, mask=ok, other=0.0).to(tl.float32)
    table = b * stride_cb + t * stride_ct + heads * stride_ch + d
    cos = tl.load(COS + table, mask=ok, other=0.0)
    sin = tl.load(SIN + table, mask=ok, other=0.0)
    out = x * cos + swapped * sin
    tl.store(OUT + ((b * T + t) * H + heads) * D + d, out.to(OUT.dtype.element_ty), mask=ok)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: :func:`rotate_triton` on CUDA without gradients, else :func:`rotate_reference`."""
    if x.is_cuda and not _needs_grad(x, cos, sin):
        return rotate_triton(x, cos, sin)
    return rotate_reference(x, cos, sin)


def rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_reference` in one kernel, for ``x [B, T, H, D]`` and tables broadcastable to it
    (``[B or 1, T, H or 1, D]`` float32); the same float32 products and sum, unfused, so the result is
    the reference's to the bit."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x: shape {tuple(x.shape)}, expected [B, T, H, D] with an even D")
    batch, steps, heads, dim = x.shape
    if (
        cos.dim() != 4
        or cos.shape != sin.shape
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or any(n not in (1, m) for n, m in zip(cos.shape, x.shape))
        or cos.shape[-1] != dim
    ):
        raise ValueError(
            f"cos, sin: shapes {tuple(cos.shape)}, {tuple(sin.shape)}, dtypes {cos.dtype}, {sin.dtype}; "
            f"expected equal float32 tables broadcastable to x's {tuple(x.shape)}, with its D"
        )
    cos, sin = (torch.broadcast_to(table, (batch, steps, cos.shape[2], dim)) for table in (cos, sin))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        head_stride = cos.stride(2) if cos.shape[2] > 1 else 0
        _rotate_kernel[(batch * steps,)](
            x, cos, sin, out, steps, heads, x.stride(0), x.stride(1), x.stride(2),
            cos.stride(0), cos.stride(1), head_stride,
            D=dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
            enable_fp_fusion=False,  # x * cos + swapped * sin rounded as PyTorch rounds it
        )
    return out
