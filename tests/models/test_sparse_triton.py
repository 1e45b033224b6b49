"""``local_rope`` on the Triton kernels (``models/sparse_triton.py``) against the torch reference.

Without CUDA the kernels run in Triton's CPU interpreter on tiny shapes, fp16 only (the interpreter
mishandles bf16). ``poison_empty`` NaN-fills every ``torch.empty``, so an unwritten block fails.
"""

import pytest
import torch

import subquad
from subquad.models.sparse_torch import sparse_attention_torch
from subquad.models.subquad.modeling import SubquadRotary

sparse_triton = pytest.importorskip("subquad.models.sparse_triton")
triton_attention = pytest.importorskip("subquad.ops.ssa.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]

# (B, T, S, Hq, Hkv, D, block_size, top_k, sink_blocks, local_blocks)
CASES = [
    (1, 63, 63, 4, 1, 32, 16, 1, 1, 2),
    (2, 45, 109, 4, 2, 64, 16, 2, 1, 2),
    (1, 97, 97, 5, 1, 64, 16, 3, 2, 1),
    (1, 17, 150, 2, 1, 32, 16, 2, 1, 3),
]


def _case_id(case):
    return "B{}-T{}-S{}-Hq{}-Hkv{}-D{}-bs{}-k{}-sink{}-local{}".format(*case)


def _setup(case, dtype):
    b, t, s, hq, hkv, d, bs, top_k, sink, local = case
    q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype)
    config = subquad.SSAConfig(block_size=bs, top_k=top_k, sink_blocks=sink, local_blocks=local)
    block_idx = subquad.select_blocks(q, k, config, causal=True).block_idx
    return q, k, v, block_idx, config


@pytest.mark.parametrize("routed", [False, True], ids=["query-major", "key-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_local_rotary_matches_reference(case, dtype, routed, poison_empty, monkeypatch):
    if routed:  # take the key-major path for the far part even at these tiny lengths
        monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", 1)
    q, k, v, block_idx, config = _setup(case, dtype)
    rotate = SubquadRotary(q.shape[-1], theta=10000.0)
    scale = q.shape[-1] ** -0.5
    local_rotary = (rotate, config.sink_blocks, config.local_blocks)
    grads = []
    outs = []
    do = torch.randn(*q.shape[:3], v.shape[-1], device=DEVICE, dtype=dtype)
    for kind in ("reference", "triton", "low-precision"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        if kind == "triton":
            out = sparse_triton.sparse_attention_local_rotary_triton(
                *leaves, block_idx, config.block_size, scale, rotate, config.sink_blocks, config.local_blocks
            )
        else:
            inputs = [t.float() for t in leaves] if kind == "reference" else leaves
            out = sparse_attention_torch(
                *inputs, block_idx, config.block_size, scale, local_rotary=local_rotary
            )
        out.backward(do.to(out.dtype))
        outs.append(out.float())
        grads.append([t.grad.float() for t in leaves])
    ref, got, low = outs
    # flash-attn's rule: the kernel's error stays within 2x that of the same math in low precision
    # (the reference gathers in fp32, so its low-precision error can be the final rounding alone:
    # allow the kernel one more rounding, 2 ulps of the largest value).
    ulp = torch.finfo(dtype).eps
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 2 * (low - ref).abs().max() + 2 * ulp * ref.abs().max()
    for name, g_ref, g_got, g_low in zip("qkv", *grads, strict=True):
        assert torch.isfinite(g_got).all(), name
        err, base = (g_got - g_ref).abs().max(), (g_low - g_ref).abs().max()
        assert err <= 2 * base + 2 * ulp * g_ref.abs().max(), f"d{name}: {err} vs low-precision {base}"


def test_merge_partials_handles_empty_parts():
    out_a = torch.randn(1, 3, 2, 4)
    out_b = torch.randn(1, 3, 2, 4)
    lse_a = torch.tensor([[[1.0, float("inf")], [0.5, 2.0], [float("inf"), float("inf")]]])
    lse_b = torch.tensor([[[float("inf"), 3.0], [1.5, 2.0], [float("inf"), float("inf")]]])
    out, lse = sparse_triton.merge_partials(out_a, lse_a, out_b, lse_b)
    assert torch.allclose(out[0, 0, 0], out_a[0, 0, 0]) and lse[0, 0, 0] == 1.0
    assert torch.allclose(out[0, 0, 1], out_b[0, 0, 1]) and lse[0, 0, 1] == 3.0
    w = torch.tensor([2.0**0.5, 2.0**1.5])
    expected = (out_a[0, 1, 0] * w[0] + out_b[0, 1, 0] * w[1]) / w.sum()
    assert torch.allclose(out[0, 1, 0], expected, atol=1e-6)
    assert torch.allclose(lse[0, 1, 1], torch.tensor(3.0))
    assert torch.isinf(lse[0, 2]).all() and (out[0, 2] == 0).all()


def test_key_major_backward_twice_with_retained_graph(monkeypatch, backward_twice):
    # The forward's work lists are used by the first backward and then dropped; a second backward
    # (retain_graph=True) must rebuild them, not fall back to tiles the key-major path never saved.
    monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", 1)
    q, k, v, block_idx, config = _setup(CASES[1], torch.float16)
    rotate = SubquadRotary(q.shape[-1], theta=10000.0)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = sparse_triton.sparse_attention_local_rotary_triton(
        *leaves,
        block_idx,
        config.block_size,
        q.shape[-1] ** -0.5,
        rotate,
        config.sink_blocks,
        config.local_blocks,
    )
    backward_twice(out, leaves)


def test_layers_of_a_chunk_share_the_fixed_work_lists(monkeypatch):
    """Given the selection's ``fixed_layout``, the local and sink slots' tiles are built by the first
    layer of a chunk and reused by the next; outputs and gradients equal those built per call."""
    from collections import OrderedDict

    triton_routed = pytest.importorskip("subquad.ops.ssa.triton_routed")
    monkeypatch.setattr(triton_attention, "ROUTED_MIN_TOKENS", 1)
    monkeypatch.setattr(triton_routed, "_FIXED_CACHE", OrderedDict())
    built = []
    build = triton_routed.build_query_tiles
    monkeypatch.setattr(triton_routed, "build_query_tiles", lambda *a: built.append(1) or build(*a))
    q, k, v, _, config = _setup(CASES[1], torch.float16)
    selection = subquad.select_blocks(q, k, config, causal=True)
    rotate = SubquadRotary(q.shape[-1], theta=10000.0)
    do = torch.randn(*q.shape[:3], v.shape[-1], device=DEVICE, dtype=q.dtype)
    results, builds = [], []
    for layout in (selection.fixed_layout, selection.fixed_layout, None):  # two layers, then uncached
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = sparse_triton.sparse_attention_local_rotary_triton(
            *leaves, selection.block_idx, config.block_size, q.shape[-1] ** -0.5, rotate,
            config.sink_blocks, config.local_blocks, layout,
        )  # fmt: skip
        results.append((out, *torch.autograd.grad(out, leaves, do)))
        builds.append(len(built))
    # The first layer builds its local and sink tiles here, the second none; the uncached call builds
    # its sink tiles here (its local ones in sparse_attention_fwd).
    assert builds == [2, 2, 3]
    for cached in results[:2]:
        for name, got, want in zip(("out", "dq", "dk", "dv"), cached, results[2], strict=True):
            assert torch.equal(got, want), name
