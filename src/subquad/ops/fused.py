"""Inference kernels for the model's small ops: RMSNorm, rotary embedding, SwiGLU's product, a decode
step's rotary embedding and cache append, and its matrix-vector products with their neighbours folded
in, one launch each.

In PyTorch a model's RMSNorm is about eight elementwise kernels (cast, square, mean, add, rsqrt,
product, cast, weight) and a rotary embedding about six per tensor, each with float32 temporaries
the size of its input. In a decode step those launches were most of the step (~650 kernels for the
12-layer ``small`` model, whose attention was ~0.3 of its 1.58 ms at 1M tokens; 1.05 ms with these
kernels, ``benchmarks/NOTES.md`` item 40), and in a long prefill they are memory passes. Here each is
one kernel reading its input once. The graphed decode step's rotation and cache append
(``rotate_append_decode_token``) are one kernel a layer, reading rotary tables its caller computes once
per key block (items 41, 45: they were ~10 PyTorch ops for the tables a step, then a rotation, two index
copies and the open block's summary re-summed a layer); an SSA step runs the same program
(``_rotate_append_program``) inside its router's first kernel (item 46); its products (``norm_linear``,
``linear_add_``, ``swiglu_linear_add_``) each replace cuBLAS and the norm, SwiGLU or residual add
beside it (item 42).

:func:`rotary_angles` is the one place rotary angles are computed (Subquad models, and transformers
models through :func:`subquad.hf.precise_rotary`).

The ``*_reference`` functions are the PyTorch definitions (the model's own math). The dispatching
functions (:func:`rms_norm`, :func:`rotate`, :func:`silu_mul`, :func:`norm_linear`, ...) run PyTorch's
ops wherever their kernel does not apply: on the CPU, and when a gradient is needed (training keeps the
autograd ops, which ``torch.compile`` fuses there).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from subquad.ops import pdl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, the norm in float32 and cast back
    to ``x.dtype`` before the weight (Llama's order); the result has ``weight``'s and ``x``'s
    promoted dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``positions[..., None] * inv_freq`` as float32 angles, computed in float64 and reduced mod 2 pi.

    float32's own product rounds to half a unit in its last place: up to 0.5 rad at 12M positions for
    the fastest frequencies, so a query and its nearby keys lose their relative rotation (all that
    rotary attention reads). ``inv_freq`` is used as given (models keep the frequencies they trained
    with)."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    return torch.remainder(angles, 2 * math.pi).to(torch.float32)


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
def _rms_norm_kernel(X, W, OUT, n_cols, stride_x, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
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
            rows,
            weight,
            out,
            cols,
            rows.stride(0),
            eps,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
            **pdl.launch_args(x.device),
        )
    return out


@triton.jit
def _rotate_kernel(
    X,
    COS,
    SIN,
    OUT,
    T,
    H,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_cb,
    stride_ct,
    stride_ch,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per (row, token): all its heads. The tables broadcast over heads (stride_ch = 0) or not.
    pdl.wait(PDL)
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
            x,
            cos,
            sin,
            out,
            steps,
            heads,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0),
            cos.stride(1),
            head_stride,
            D=dim,
            BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_D=triton.next_power_of_2(dim),
            enable_fp_fusion=False,  # x * cos + swapped * sin rounded as PyTorch rounds it
            **pdl.launch_args(x.device),
        )
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up``, as the model's MLP computes it (two rounded ops)."""
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(GATE, UP, OUT, n_cols, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    # Rounded to the input dtype between the two ops, as F.silu(gate) * up rounds.
    act = (g / (1.0 + tl.exp(-g))).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, (act * u).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: :func:`silu_mul_triton` on CUDA without gradients, else the reference."""
    if gate.is_cuda and not _needs_grad(gate, up):
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul_reference` in one kernel. ``gate`` and ``up`` may be views of one tensor (the
    halves of a fused gate/up projection); the output is contiguous. The exponential may differ from
    PyTorch's in its last bit, so an output may differ from the reference's by one rounding step."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate, up: shapes {tuple(gate.shape)}, {tuple(up.shape)}, dtypes {gate.dtype}, {up.dtype}, "
            f"devices {gate.device}, {up.device}; expected one shape, dtype and device"
        )
    cols = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, cols), up.reshape(-1, cols)
    if gate_rows.stride(-1) != 1:
        gate_rows = gate_rows.contiguous()
    if up_rows.stride(-1) != 1:
        up_rows = up_rows.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(cols))
        _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(cols, block))](
            gate_rows,
            up_rows,
            out,
            cols,
            gate_rows.stride(0),
            up_rows.stride(0),
            BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )
    return out


def rotate_append_decode_token_reference(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    means: torch.Tensor,
) -> torch.Tensor:
    """A decode step's rotary embedding and cache append, in place: returns the rotated queries.

    ``qkv [B, 1, Hq + 2 Hkv, D]``: the step's q, k and v heads side by side (one projection's output).
    ``pos``: ``[1]`` int64 on the device, every row's new position. ``cos``, ``sin``: float32 ``[S, D]``
    rotary tables (``SubquadRotary.tables``) of the ``S = block_size`` positions of ``pos``'s key block,
    read at row ``pos % S``. q and k are rotated as :func:`rotate_reference`; the rotated key and the
    value go to ``key_buf [B, N, Hkv, D]`` / ``value_buf [B, N, Hkv, D]`` at ``pos``, and ``means [B, NB,
    Hkv, D]`` float32 gets the mean key of the block ``pos`` lands in. Slots past ``pos`` must hold zeros
    (the cache's invariant), so the whole block is summed and divided by the keys it holds. Returns
    ``[B, 1, Hq, D]``."""
    heads_kv = key_buf.shape[2]
    heads_q = qkv.shape[2] - 2 * heads_kv
    block_size = cos.shape[0]
    row = torch.remainder(pos, block_size)
    qk = rotate_reference(qkv[:, :, : heads_q + heads_kv], cos[row], sin[row])
    key_buf.index_copy_(1, pos, qk[:, :, heads_q:])
    value_buf.index_copy_(1, pos, qkv[:, :, heads_q + heads_kv :])
    block = torch.div(pos, block_size, rounding_mode="floor")
    slots = block * block_size + torch.arange(block_size, device=pos.device)
    sums = key_buf.index_select(1, slots).float().sum(1, keepdim=True)
    means.index_copy_(1, block, sums / (pos - block * block_size + 1).float())
    return qk[:, :, :heads_q]


@triton.jit
def _token_tables(POS, COS, SIN, d, d_ok, D: tl.constexpr, BS: tl.constexpr):
    """The new token's position, its key block, and its rows of the rotary tables (``[BLOCK_D]`` each)."""
    pos = tl.load(POS)
    block = pos // BS
    table = (pos - block * BS) * D + d
    return pos, block, tl.load(COS + table, mask=d_ok, other=0.0), tl.load(SIN + table, mask=d_ok, other=0.0)


@triton.jit
def _rotated_heads(X, cos, sin, d, ok, D: tl.constexpr):
    """The heads at ``X`` (a pointer, or ``[R, 1]`` pointers to R heads) rotated as rotate_reference, in
    float32 ``[R, BLOCK_D]``: x * cos + swapped * sin, three roundings (kernels calling this launch with
    ``enable_fp_fusion=False``)."""
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    x = tl.load(X + d[None, :], mask=ok, other=0.0).to(tl.float32)
    swapped = tl.load(X + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    return x * cos[None, :] + swapped * sin[None, :]


@triton.jit
def _rotate_append_program(
    QKV,
    COS,
    SIN,
    Q_OUT,
    KEY_BUF,
    VALUE_BUF,
    MEANS,
    POS,
    b,
    h,
    HKV,
    s_x_b,
    s_x_h,
    s_kb_b,
    s_kb_s,
    s_kb_h,
    s_vb_b,
    s_vb_s,
    s_vb_h,
    s_m_b,
    s_m_n,
    s_m_h,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """Row ``b``, KV head ``h`` of rotate_append_decode_token: its GROUP query heads, its key and value.

    Before the PDL wait: the position, its table rows and the block's earlier keys. A decode step writes
    them only in kernels at least two launches back (the position after the last layer; a key a step
    before), which had finished when this kernel could start. The q/k/v heads after the wait."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pos, block, cos, sin = _token_tables(POS, COS, SIN, d, d_ok, D, BS)
    # The block's earlier keys from the buffer, the new one from registers.
    slots = block * BS + tl.arange(0, BLOCK_S)
    earlier = tl.load(
        KEY_BUF + b * s_kb_b + slots[:, None] * s_kb_s + h * s_kb_h + d[None, :],
        mask=(slots[:, None] < pos) & d_ok[None, :],
        other=0.0,
    )
    pdl.wait(PDL)
    g = tl.arange(0, BLOCK_G)[:, None]
    q_ok = (g < GROUP) & d_ok[None, :]
    q = _rotated_heads(QKV + b * s_x_b + (h * GROUP + g) * s_x_h, cos, sin, d, q_ok, D)
    tl.store(Q_OUT + ((b * HKV + h) * GROUP + g) * D + d[None, :], q.to(Q_OUT.dtype.element_ty), mask=q_ok)
    x_k = QKV + b * s_x_b + (HKV * GROUP + h) * s_x_h
    key = tl.reshape(_rotated_heads(x_k, cos, sin, d, d_ok[None, :], D), [BLOCK_D])
    key = key.to(KEY_BUF.dtype.element_ty)
    value = tl.load(QKV + b * s_x_b + (HKV * GROUP + HKV + h) * s_x_h + d, mask=d_ok, other=0.0)
    tl.store(KEY_BUF + b * s_kb_b + pos * s_kb_s + h * s_kb_h + d, key, mask=d_ok)
    tl.store(VALUE_BUF + b * s_vb_b + pos * s_vb_s + h * s_vb_h + d, value, mask=d_ok)
    sums = tl.sum(earlier.to(tl.float32), axis=0) + key.to(tl.float32)
    count = (pos - block * BS + 1).to(tl.float32)
    tl.store(MEANS + b * s_m_b + block * s_m_n + h * s_m_h + d, sums / count, mask=d_ok)


@triton.jit
def _rotate_append_kernel(
    QKV,
    COS,
    SIN,
    Q_OUT,
    KEY_BUF,
    VALUE_BUF,
    MEANS,
    POS,
    HKV,
    s_x_b,
    s_x_h,
    s_kb_b,
    s_kb_s,
    s_kb_h,
    s_vb_b,
    s_vb_s,
    s_vb_h,
    s_m_b,
    s_m_n,
    s_m_h,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per (row, KV head).
    b = (tl.program_id(0) // HKV).to(tl.int64)
    h = (tl.program_id(0) % HKV).to(tl.int64)
    _rotate_append_program(
        QKV,
        COS,
        SIN,
        Q_OUT,
        KEY_BUF,
        VALUE_BUF,
        MEANS,
        POS,
        b,
        h,
        HKV,
        s_x_b,
        s_x_h,
        s_kb_b,
        s_kb_s,
        s_kb_h,
        s_vb_b,
        s_vb_s,
        s_vb_h,
        s_m_b,
        s_m_n,
        s_m_h,
        GROUP,
        D,
        BS,
        BLOCK_G,
        BLOCK_S,
        BLOCK_D,
        PDL,
    )


def rotate_append_decode_token(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    means: torch.Tensor,
) -> torch.Tensor:
    """:func:`rotate_append_decode_token_reference`: one kernel on CUDA, the PyTorch ops elsewhere."""
    if key_buf.is_cuda:
        return rotate_append_decode_token_triton(qkv, cos, sin, pos, key_buf, value_buf, means)
    return rotate_append_decode_token_reference(qkv, cos, sin, pos, key_buf, value_buf, means)


def check_rotate_append(qkv, cos, sin, pos, key_buf, value_buf, means) -> int:
    """Validate :func:`rotate_append_decode_token_triton`'s arguments (a kernel would read out of bounds
    on bad ones); returns the number of query heads."""
    batch, capacity, heads_kv, dim = key_buf.shape
    width = qkv.shape[2] if qkv.dim() == 4 else 0
    heads_q = width - 2 * heads_kv
    if (
        qkv.dim() != 4
        or (qkv.shape[0], qkv.shape[1], qkv.shape[3]) != (batch, 1, dim)
        or heads_q < heads_kv
        or heads_q % heads_kv
        or qkv.dtype != key_buf.dtype
        or qkv.stride(-1) != 1
    ):
        raise ValueError(
            f"qkv: shape {tuple(qkv.shape)}, dtype {qkv.dtype}; expected [{batch}, 1, Hq + {2 * heads_kv}, "
            f"{dim}] in {key_buf.dtype} (key_buf's), Hq a multiple of {heads_kv}, with a contiguous last dim"
        )
    block_size = cos.shape[0] if cos.dim() == 2 else 0
    if (
        cos.shape != (block_size, dim)
        or sin.shape != cos.shape
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or not (cos.is_contiguous() and sin.is_contiguous())
        or block_size < 1
    ):
        raise ValueError(
            f"cos, sin: shapes {tuple(cos.shape)}, {tuple(sin.shape)}, dtypes {cos.dtype}, {sin.dtype}; "
            f"expected contiguous float32 [block_size, {dim}] tables"
        )
    if tuple(value_buf.shape) != (batch, capacity, heads_kv, dim) or value_buf.dtype != key_buf.dtype:
        raise ValueError(
            f"value_buf: shape {tuple(value_buf.shape)}, dtype {value_buf.dtype}; expected "
            f"{(batch, capacity, heads_kv, dim)} in {key_buf.dtype} (key_buf's)"
        )
    if (
        means.dim() != 4
        or means.dtype != torch.float32
        or (means.shape[0], means.shape[2], means.shape[3]) != (batch, heads_kv, dim)
        or means.shape[1] * block_size < capacity
    ):
        raise ValueError(
            f"means: shape {tuple(means.shape)}, dtype {means.dtype}; expected float32 [{batch}, "
            f">= {-(-capacity // block_size)}, {heads_kv}, {dim}]"
        )
    if pos.shape != (1,) or pos.dtype != torch.int64 or pos.device != key_buf.device:
        raise ValueError(
            f"pos: shape {tuple(pos.shape)}, dtype {pos.dtype}, device {pos.device}; expected a [1] int64 "
            f"tensor on {key_buf.device}"
        )
    if key_buf.stride(-1) != 1 or value_buf.stride(-1) != 1 or means.stride(-1) != 1:
        raise ValueError("key_buf, value_buf, means: expected a contiguous last dim")
    return heads_q


def rotate_append_decode_token_triton(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    means: torch.Tensor,
) -> torch.Tensor:
    """:func:`rotate_append_decode_token_reference` in one kernel (no host sync: ``pos`` is read on the
    device). Rotations and stores are the reference's to the bit; the block's keys are summed in another
    order, so a mean may differ in its last bit."""
    heads_q = check_rotate_append(qkv, cos, sin, pos, key_buf, value_buf, means)
    batch, _, heads_kv, dim = key_buf.shape
    block_size = cos.shape[0]
    q = torch.empty(batch, 1, heads_q, dim, dtype=qkv.dtype, device=qkv.device)
    _rotate_append_kernel[(batch * heads_kv,)](
        qkv,
        cos,
        sin,
        q,
        key_buf,
        value_buf,
        means,
        pos,
        heads_kv,
        qkv.stride(0),
        qkv.stride(2),
        key_buf.stride(0),
        key_buf.stride(1),
        key_buf.stride(2),
        value_buf.stride(0),
        value_buf.stride(1),
        value_buf.stride(2),
        means.stride(0),
        means.stride(1),
        means.stride(2),
        GROUP=heads_q // heads_kv,
        D=dim,
        BS=block_size,
        BLOCK_G=triton.next_power_of_2(heads_q // heads_kv),
        BLOCK_S=triton.next_power_of_2(block_size),
        BLOCK_D=triton.next_power_of_2(dim),
        enable_fp_fusion=False,  # the rotation rounded as PyTorch rounds it
        **pdl.launch_args(key_buf.device),
    )
    return q


def inline_ptx(device: torch.device) -> bool:
    """Whether kernels on ``device`` may emit inline PTX (:func:`prefetch_l2`, ``triton_attention._exp2``):
    compiled CUDA, not the interpreter."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def prefetch_l2(ptrs, mask, PREFETCH: tl.constexpr):
    """Ask L2 for the lines at ``ptrs`` where ``mask`` (``prefetch.global.L2``; nothing unless PREFETCH,
    :func:`inline_ptx`). No register waits on a prefetch, so it holds back nothing after it."""
    if PREFETCH:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def store_as_held(ptrs, value, mask, IN_PLACE: tl.constexpr):
    """``tl.store`` of int64 ``value`` where ``mask``. ``IN_PLACE`` (:func:`inline_ptx`): a ``st.global``
    from the threads that hold each element, in the tensor's layout. Triton gives a store the layout
    that coalesces its addresses, so a vector reduced from a matrix-product tile (one value a row, held
    by the lanes of a quad) moved there through shared memory: its pointers, values and mask, six
    barriers a store in the threshold router (benchmarks/NOTES.md item 95), for scattered addresses that
    gain nothing from it. Lanes holding the same element store the same value."""
    if IN_PLACE:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b64 [$1], $2; mov.u32 $0, 0; }",
            "=r,l,l,r",
            [ptrs, value, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.store(ptrs, value, mask=mask)


# --- decode-step matmuls: one token per row, the weights read once ---------------------------------------
# At a decode step each projection is a matrix-vector product: cuBLAS takes 4-6 us for `small`'s
# (1.2-8.6 MB of weights, 0.3-2 TB/s), plus a kernel each for the RMSNorm before it, SwiGLU's product
# and the residual add around it. These kernels fold those into the product's loads and store.
# Above GEMV_MAX_ROWS rows the weights' reuse favours cuBLAS, and the references run.
GEMV_MAX_ROWS = 8
_NO_PROLOGUE, _NORM, _SWIGLU = 0, 1, 2


@triton.jit
def _gemv_input(x_row, nw, W, k, k_ok, rstd, N_IN: tl.constexpr, PROLOGUE: tl.constexpr):
    """f(X)[row, k] in float32, f the prologue: none, RMSNorm (``rstd``, the norm weights ``nw`` of columns
    ``k``, already loaded) or SwiGLU's silu(gate) * up over the row's two halves (N_IN each); rounded
    where the model's PyTorch ops round (rms_norm_reference, silu_mul_reference)."""
    dtype = x_row.dtype.element_ty
    xk = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        normed = (xk * rstd).to(dtype).to(tl.float32)
        xk = (nw.to(tl.float32) * normed).to(W.dtype.element_ty).to(tl.float32)
    elif PROLOGUE == 2:
        up = tl.load(x_row + N_IN + k, mask=k_ok, other=0.0).to(tl.float32)
        act = (xk / (1.0 + tl.exp(-xk))).to(dtype).to(tl.float32)
        xk = (act * up).to(dtype).to(tl.float32)
    return xk


@triton.jit
def _gemv_tile(w, nw, x_row, W, start, SIZE: tl.constexpr, rstd, N_IN: tl.constexpr, PROLOGUE: tl.constexpr):
    """``sum_k f(X)[row, k] * w[:, k]`` over the ``SIZE`` columns from ``start``, ``w`` and ``nw`` loaded."""
    k = start + tl.arange(0, SIZE)
    xk = _gemv_input(x_row, nw, W, k, k < N_IN, rstd, N_IN, PROLOGUE)
    return tl.sum(w.to(tl.float32) * xk[None, :], axis=1)


@triton.jit
def _norm_weights(NORM_W, start, SIZE: tl.constexpr, N_IN: tl.constexpr, PROLOGUE: tl.constexpr):
    """The RMSNorm weights of ``SIZE`` columns from ``start`` (PROLOGUE 1; unused zeros otherwise)."""
    k = start + tl.arange(0, SIZE)
    if PROLOGUE == 1:
        nw = tl.load(NORM_W + k, mask=k < N_IN, other=0.0)
    else:
        nw = tl.zeros([SIZE], dtype=NORM_W.dtype.element_ty)
    return nw


@triton.jit
def _squares(x_row, start, SIZE: tl.constexpr, N_IN: tl.constexpr, copy_row, copy, GATHER: tl.constexpr):
    """Sum of squares of ``SIZE`` columns from ``start`` (GATHER and ``copy``: stored at ``copy_row``)."""
    k = start + tl.arange(0, SIZE)
    x = tl.load(x_row + k, mask=k < N_IN, other=0.0)
    if GATHER:
        if copy:
            tl.store(copy_row + k, x, mask=k < N_IN)
    x = x.to(tl.float32)
    return tl.sum(x * x, axis=0)


@triton.jit
def _gemv_kernel(
    X, IDS, NORM_W, W, OUT, RES, COPY, POS, LENS,
    n_out, n_table, n_lens, stride_x, stride_w, stride_out, stride_res, stride_copy, eps,
    N_IN: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, GATHER: tl.constexpr,
    ADVANCE: tl.constexpr, LENS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PRE0: tl.constexpr, PRE1: tl.constexpr, PRE2: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Program (output block, row): OUT[row, n] (+)= sum_k f(X)[row, k] * W[n, k] (f: _gemv_input).
    # The weights of the first PRE0 + PRE1 + PRE2 columns (tiles of powers of two, PRE1 and PRE2 may be
    # 0), and their RMSNorm weights, are loaded before the PDL wait, so they stream while the previous
    # kernel still runs; the rest after it, in BLOCK_K chunks. The chunk loops are unrolled, so every
    # chunk's loads are in flight at once (a rolled loop waits for each).
    # GATHER (with the RMSNorm prologue): X is a table of n_table rows and row r reads X[IDS[r]], which
    # the row's first program also copies to COPY[r] (an embedding lookup folded in; an id out of range
    # gives NaN). ADVANCE: program (0, 0) adds 1 to POS[0] and LENS[:n_lens] once every kernel before
    # this one has finished (a decode step's position and lengths, after their last reader).
    row = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_w
    w0 = tl.load(w_rows + tl.arange(0, PRE0)[None, :], mask=n_ok[:, None], other=0.0)
    nw0 = _norm_weights(NORM_W, 0, PRE0, N_IN, PROLOGUE)
    if PRE1 > 0:
        w1 = tl.load(w_rows + PRE0 + tl.arange(0, PRE1)[None, :], mask=n_ok[:, None], other=0.0)
        nw1 = _norm_weights(NORM_W, PRE0, PRE1, N_IN, PROLOGUE)
    if PRE2 > 0:
        w2 = tl.load(w_rows + PRE0 + PRE1 + tl.arange(0, PRE2)[None, :], mask=n_ok[:, None], other=0.0)
        nw2 = _norm_weights(NORM_W, PRE0 + PRE1, PRE2, N_IN, PROLOGUE)
    pdl.wait(PDL)
    if ADVANCE:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(POS, tl.load(POS) + 1)
            lens = tl.arange(0, LENS_PAD)
            tl.store(LENS + lens, tl.load(LENS + lens, mask=lens < n_lens) + 1, mask=lens < n_lens)
    if GATHER:
        token = tl.load(IDS + row)
        valid = (token >= 0) & (token < n_table)
        x_row = X + tl.where(valid, token, 0).to(tl.int64) * stride_x
    else:
        x_row = X + row * stride_x
    copy_row = COPY + row * stride_copy
    copy = tl.program_id(0) == 0
    rstd = 0.0
    if PROLOGUE == 1:  # the row's RMS, over the same tiles and chunks
        squares = _squares(x_row, 0, PRE0, N_IN, copy_row, copy, GATHER)
        if PRE1 > 0:
            squares += _squares(x_row, PRE0, PRE1, N_IN, copy_row, copy, GATHER)
        if PRE2 > 0:
            squares += _squares(x_row, PRE0 + PRE1, PRE2, N_IN, copy_row, copy, GATHER)
        for k0 in tl.static_range(PRE0 + PRE1 + PRE2, N_IN, BLOCK_K):
            squares += _squares(x_row, k0, BLOCK_K, N_IN, copy_row, copy, GATHER)
        rstd = tl.math.rsqrt(squares / N_IN + eps)
        if GATHER:
            rstd = tl.where(valid, rstd, float("nan"))
    acc = _gemv_tile(w0, nw0, x_row, W, 0, PRE0, rstd, N_IN, PROLOGUE)
    if PRE1 > 0:
        acc += _gemv_tile(w1, nw1, x_row, W, PRE0, PRE1, rstd, N_IN, PROLOGUE)
    if PRE2 > 0:
        acc += _gemv_tile(w2, nw2, x_row, W, PRE0 + PRE1, PRE2, rstd, N_IN, PROLOGUE)
    for k0 in tl.static_range(PRE0 + PRE1 + PRE2, N_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < N_IN
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        nw = _norm_weights(NORM_W, k0, BLOCK_K, N_IN, PROLOGUE)
        xk = _gemv_input(x_row, nw, W, k, k_ok, rstd, N_IN, PROLOGUE)
        acc += tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
    if HAS_RES:
        acc += tl.load(RES + row * stride_res + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + offs_n, acc.to(OUT.dtype.element_ty), mask=n_ok)


# Weight elements a program loads before its PDL wait: `small`'s products (K 768 and 2816) whole; 6144
# bf16 are 96 registers a thread of its one warp.
GEMV_PREFETCH = 6144


def _prefetch_tiles(n_in: int, budget: int) -> list[int]:
    """Up to three power-of-two column tiles, largest first, covering ``min(n_in, budget)`` columns or
    as many as three tiles can (the rest is loaded after the wait); 0 for a tile not used."""
    tiles, left = [], min(n_in, budget)
    while left and len(tiles) < 3:
        tiles.append(1 << (left.bit_length() - 1))
        left -= tiles[-1]
    return tiles + [0] * (3 - len(tiles))


def _gemv(x, norm_weight, weight, out, residual, eps, prologue, n_in, gather=None, advance=None) -> None:
    """Launch _gemv_kernel. ``gather``: ``(ids [rows] int64, copy [rows, n_in])``, ``x`` then being the
    table the rows are looked up in; ``advance``: ``(pos [1] int64, lengths [n] int32)``."""
    rows, n_out = (x.shape[0] if gather is None else gather[0].shape[0]), weight.shape[0]
    # 2-4 output rows per program of one warp (two when its rows' weights exceed the prefetch budget):
    # many small programs keep the most loads in flight, and 4 rows for q/k/v and down made the graphed
    # step at 1M 0.300 -> 0.288 ms (sweeps on the H200, NOTES items 42, 45 and 47; programs of 8-64 rows
    # and 2-16 warps lost 0.1-3.8 us a product in the step's chain).
    block_n = 2 if n_out < 1024 and n_in <= 1024 else 4
    warps = 1 if block_n * n_in <= GEMV_PREFETCH else 2
    tiles = _prefetch_tiles(n_in, GEMV_PREFETCH * warps // block_n)
    ids, copy = gather if gather is not None else (out, out)
    pos, lengths = advance if advance is not None else (out, out)
    _gemv_kernel[(triton.cdiv(n_out, block_n), rows)](
        x, ids, norm_weight if norm_weight is not None else weight, weight, out,
        residual if residual is not None else out, copy, pos, lengths,
        n_out, x.shape[0], lengths.numel(),
        x.stride(0), weight.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        copy.stride(0), eps,
        N_IN=n_in, PROLOGUE=prologue, HAS_RES=residual is not None, GATHER=gather is not None,
        ADVANCE=advance is not None, LENS_PAD=max(2, triton.next_power_of_2(lengths.numel())),
        BLOCK_N=block_n, PRE0=tiles[0], PRE1=tiles[1], PRE2=tiles[2],
        BLOCK_K=min(256, triton.next_power_of_2(max(16, n_in - sum(tiles)))), num_warps=warps,
        **pdl.launch_args(x.device),
    )  # fmt: skip


def _check_gemv(name: str, x: torch.Tensor, weight: torch.Tensor, halves: bool = False) -> None:
    if x.dim() != 2 or x.stride(-1) != 1 or weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError(
            f"{name}, weight: shapes {tuple(x.shape)}, {tuple(weight.shape)}; expected 2-D with a "
            "contiguous last dim"
        )
    if halves and x.shape[1] % 2:
        raise ValueError(f"{name}: shape {tuple(x.shape)}, expected [rows, 2 * I] (gate, then up)")
    n_in = x.shape[1] // 2 if halves else x.shape[1]
    if weight.shape[1] != n_in or x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)}, {weight.dtype} on {weight.device}; expected "
            f"[N, {n_in}] in {name}'s dtype {x.dtype} on {x.device}"
        )


def _check_residual(residual: torch.Tensor, rows: int, n_out: int, dtype: torch.dtype) -> None:
    if tuple(residual.shape) != (rows, n_out) or residual.stride(-1) != 1 or residual.dtype != dtype:
        raise ValueError(
            f"residual: shape {tuple(residual.shape)}, {residual.dtype}; expected [{rows}, {n_out}] in "
            f"{dtype} with a contiguous last dim"
        )


def _use_gemv(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The kernel's case: CUDA, few 2-D rows, one dtype, no gradient (anything else: PyTorch's ops)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] <= GEMV_MAX_ROWS
        and all(t.dtype == x.dtype for t in tensors)
        and not _needs_grad(x, *tensors)
    )


def norm_linear_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
) -> torch.Tensor:
    """``F.linear(rms_norm(x), weight)``: a pre-norm projection, ``x [rows, C]``, ``weight [N, C]``."""
    return F.linear(rms_norm_reference(x, norm_weight, eps), weight)


def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    advance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`norm_linear_triton` on CUDA for at most ``GEMV_MAX_ROWS`` rows without gradients, else
    the reference (and ``advance``'s counters incremented after it)."""
    if _use_gemv(x, norm_weight, weight):
        return norm_linear_triton(x, norm_weight, eps, weight, advance)
    _check_advance(advance, x.device)
    out = F.linear(rms_norm(x, norm_weight, eps), weight)
    _advance_reference(advance)
    return out


def norm_linear_triton(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    advance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`norm_linear_reference` in one kernel (the RMSNorm recomputed by every output block: the
    row is a few KB). Sums in another order than the references: the last bit may differ.

    ``advance``: ``(pos, lengths)``, int64 ``[1]`` and int32 ``[n]`` on ``x``'s device, each incremented
    by one in the same kernel once every kernel queued before it has finished (a graphed decode step's
    position and lengths, advanced by its last kernel instead of two more)."""
    _check_gemv("x", x, weight)
    _check_norm_weight(norm_weight, x.shape[1], weight.dtype)
    _check_advance(advance, x.device)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if out.numel():
        _gemv(x, norm_weight, weight, out, None, eps, _NORM, x.shape[1], advance=advance)
    else:
        _advance_reference(advance)
    return out


def embed_norm_linear_reference(
    ids: torch.Tensor, table: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """A decode step's embedding lookup and first pre-norm projection: ``residual[:] = table[ids]``, then
    :func:`norm_linear_reference` of it. ``ids [rows]`` int64, ``table [V, C]``, ``residual [rows, C]``."""
    residual.copy_(F.embedding(ids, table))
    return norm_linear_reference(residual, norm_weight, eps, weight)


def embed_norm_linear(
    ids: torch.Tensor, table: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """:func:`embed_norm_linear_triton` where :func:`norm_linear` runs its kernel, else PyTorch's ops."""
    if _use_gemv(residual, table, norm_weight, weight):
        return embed_norm_linear_triton(ids, table, residual, norm_weight, eps, weight)
    residual.copy_(F.embedding(ids, table))
    return norm_linear(residual, norm_weight, eps, weight)


def embed_norm_linear_triton(
    ids: torch.Tensor, table: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """:func:`embed_norm_linear_reference` in one kernel: every program reads its row of the table, and
    the row's first program also writes it to ``residual``. The ids are read on the device: one out of
    range gives NaN outputs rather than an error (its residual row is the table's first)."""
    _check_gemv("table", table, weight)
    _check_norm_weight(norm_weight, table.shape[1], weight.dtype)
    rows = residual.shape[0] if residual.dim() == 2 else -1
    if ids.dim() != 1 or ids.dtype != torch.int64 or ids.device != table.device or ids.shape[0] != rows:
        raise ValueError(
            f"ids: shape {tuple(ids.shape)}, {ids.dtype} on {ids.device}; expected [{rows}] int64 on "
            f"{table.device} (one id per row of residual)"
        )
    _check_residual(residual, ids.shape[0], table.shape[1], table.dtype)
    out = torch.empty(ids.shape[0], weight.shape[0], dtype=table.dtype, device=table.device)
    if out.numel():
        _gemv(table, norm_weight, weight, out, None, eps, _NORM, table.shape[1], gather=(ids, residual))
    return out


def _check_norm_weight(norm_weight: torch.Tensor, n_in: int, dtype: torch.dtype) -> None:
    if norm_weight.shape != (n_in,) or norm_weight.dtype != dtype or norm_weight.stride(0) != 1:
        raise ValueError(
            f"norm_weight: shape {tuple(norm_weight.shape)}, {norm_weight.dtype}; expected ({n_in},) in "
            f"{dtype}"
        )


def _check_advance(advance, device: torch.device) -> None:
    if advance is None:
        return
    pos, lengths = advance if isinstance(advance, tuple) and len(advance) == 2 else (None, None)
    if not (
        isinstance(pos, torch.Tensor) and isinstance(lengths, torch.Tensor)
        and pos.shape == (1,) and pos.dtype == torch.int64 and pos.device == device
        and lengths.dim() == 1 and lengths.dtype == torch.int32 and lengths.stride(0) == 1
        and lengths.device == device
    ):  # fmt: skip
        parts = advance if isinstance(advance, tuple) else (advance,)
        got = [(tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else t for t in parts]
        raise ValueError(
            f"advance: got {got}; expected (pos [1] int64, lengths [n] int32 contiguous) on {device}"
        )


def _advance_reference(advance) -> None:
    if advance is not None:
        for counter in advance:
            counter.add_(1)


def linear_add_reference(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual += x @ weight.T`` in place (one rounding, as ``addmm_``), ``x [rows, K]``,
    ``weight [N, K]``, ``residual [rows, N]``; returns ``residual``."""
    return residual.addmm_(x, weight.t())


def linear_add_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`linear_add_triton` on CUDA for at most ``GEMV_MAX_ROWS`` rows without gradients, else
    the reference."""
    if _use_gemv(x, weight, residual):
        return linear_add_triton(residual, x, weight)
    return linear_add_reference(residual, x, weight)


def linear_add_triton(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`linear_add_reference` in one kernel."""
    _check_gemv("x", x, weight)
    _check_residual(residual, x.shape[0], weight.shape[0], x.dtype)
    if residual.numel():
        _gemv(x, None, weight, residual, residual, 0.0, _NO_PROLOGUE, x.shape[1])
    return residual


def swiglu_linear_add_reference(
    residual: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``residual += silu_mul(gate, up) @ weight.T`` in place, with ``gate_up [rows, 2I]`` the gate and
    up projections side by side and ``weight [N, I]`` (SwiGLU's down projection); returns ``residual``."""
    inner = gate_up.shape[-1] // 2
    return residual.addmm_(silu_mul_reference(gate_up[:, :inner], gate_up[:, inner:]), weight.t())


def swiglu_linear_add_(residual: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_linear_add_triton` on CUDA for at most ``GEMV_MAX_ROWS`` rows without gradients,
    else the reference."""
    if _use_gemv(gate_up, weight, residual):
        return swiglu_linear_add_triton(residual, gate_up, weight)
    inner = gate_up.shape[-1] // 2
    return residual.addmm_(silu_mul(gate_up[:, :inner], gate_up[:, inner:]), weight.t())


def swiglu_linear_add_triton(
    residual: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """:func:`swiglu_linear_add_reference` in one kernel: the product computed as the weights stream."""
    _check_gemv("gate_up", gate_up, weight, halves=True)
    _check_residual(residual, gate_up.shape[0], weight.shape[0], gate_up.dtype)
    if residual.numel():
        _gemv(gate_up, None, weight, residual, residual, 0.0, _SWIGLU, gate_up.shape[1] // 2)
    return residual
