"""Dense attention under ``local_rope`` (``models/dense_local.py``): the flash-based function against the
reference, both against SSA's ``local_rope`` scoring at full budget, and the dense twin model built on it."""

import pytest
import torch

import subquad
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.dense_local import dense_local_rotary_attention, dense_local_rotary_reference
from subquad.models.sparse_torch import sparse_attention_torch
from subquad.models.subquad.modeling import SubquadRotary

# (B, T, S, Hq, Hkv, D, block_size, local_blocks): training shapes (T == S), prefill chunks (T < S,
# unaligned), a decode step, GQA 1 / 3 / 4 / 5.
CASES = [
    (2, 77, 77, 4, 2, 16, 16, 2),
    (1, 23, 100, 3, 1, 16, 16, 2),
    (2, 1, 59, 4, 4, 32, 16, 3),
    (1, 150, 150, 2, 2, 16, 16, 1),
    (1, 5, 5, 2, 1, 16, 16, 2),
    (1, 40, 161, 5, 1, 16, 16, 3),
]


def _case_id(case):
    return "B{}-T{}-S{}-Hq{}-Hkv{}-D{}-bs{}-local{}".format(*case)


def _inputs(case, dtype=torch.float32, device="cpu"):
    b, t, s, hq, hkv, d, _, _ = case
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(b, t, hq, d), make(b, s, hkv, d), make(b, s, hkv, d)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_flash_parts_equal_the_reference_and_full_budget_ssa(case):
    *_, d, bs, local = case
    q, k, v = _inputs(case)
    rotary = SubquadRotary(d, 10000.0)
    want = dense_local_rotary_reference(q, k, v, 0.3, rotary, bs, local)
    got = dense_local_rotary_attention(q, k, v, 0.3, rotary, bs, local)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # SSA's local_rope scoring with every block selected is the same function.
    config = subquad.SSAConfig(block_size=bs, top_k=64, sink_blocks=1, local_blocks=local)
    block_idx = subquad.select_blocks(q.detach(), k.detach(), config, causal=True).block_idx
    ssa = sparse_attention_torch(q, k, v, block_idx, bs, 0.3, local_rotary=(rotary, 1, local))
    torch.testing.assert_close(ssa, want, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_window_rule_and_causality():
    # Brute force, one query at a time: rotary scores inside the block-aligned window, plain before it.
    case = (1, 70, 70, 2, 1, 16, 16, 2)
    q, k, v = (t.detach() for t in _inputs(case))
    rotary = SubquadRotary(16, 10000.0)
    got = dense_local_rotary_attention(q, k, v, 0.25, rotary, 16, 2)
    for p in (0, 15, 16, 31, 32, 47, 63, 69):
        window = max(0, (p // 16 - 1) * 16)
        keys = torch.arange(p + 1)
        q_rot = rotary(q[0, p], torch.tensor(p))  # [Hq, D]
        k_rot = rotary(k[0, : p + 1, 0], keys)  # [p + 1, D]
        scores = torch.where(keys >= window, q_rot @ k_rot.T, q[0, p] @ k[0, : p + 1, 0].T) * 0.25
        torch.testing.assert_close(
            got[0, p], torch.softmax(scores, -1) @ v[0, : p + 1, 0], atol=1e-6, rtol=1e-5
        )
    # Later keys change nothing up to the position.
    k2, v2 = k.clone(), v.clone()
    k2[:, 41:], v2[:, 41:] = torch.randn_like(k2[:, 41:]), torch.randn_like(v2[:, 41:])
    again = dense_local_rotary_attention(q, k2, v2, 0.25, rotary, 16, 2)
    torch.testing.assert_close(again[:, :41], got[:, :41], atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_size=0), "block_size=0"),
        (dict(local_blocks=True), "local_blocks=True"),
        (dict(q=torch.randn(1, 9, 2, 16)), "q length=9"),
        (dict(q=torch.randn(1, 4, 3, 16)), "q heads=3"),
        (dict(v=torch.randn(1, 7, 2, 16)), "inconsistent shapes"),
        (dict(q=torch.randn(4, 2, 16)), "4-D"),
    ],
)
def test_validation(change, match):
    args = dict(q=torch.randn(1, 4, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16),
                scale=0.25, rotate=SubquadRotary(16, 10000.0), block_size=16, local_blocks=2)  # fmt: skip
    args.update(change)
    for fn in (dense_local_rotary_attention, dense_local_rotary_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_dense_twin_equals_full_budget_ssa_model():
    # The local_rope twin and an SSA model that selects every block compute the same function.
    dense = SubquadForCausalLM(
        SubquadConfig.from_flavor("debug", attention="dense", position_scheme="local_rope")
    )
    full = SubquadForCausalLM(
        SubquadConfig.from_flavor("debug", position_scheme="local_rope", ssa={"top_k": 64})
    )
    full.load_state_dict(dense.state_dict())
    sparse = SubquadForCausalLM(SubquadConfig.from_flavor("debug", position_scheme="local_rope"))
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        want = dense.eval()(ids).logits
        torch.testing.assert_close(full.eval()(ids).logits, want, atol=2e-5, rtol=1e-4)
        assert (sparse.eval()(ids).logits - want).abs().max() > 1e-3  # the default budget does drop keys
    # Training: one backward through the twin reaches every weight.
    loss = dense.train()(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA flash kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    CASES
    + [(1, 1000, 1000, 5, 1, 64, 64, 2), (1, 333, 4097, 5, 1, 64, 64, 2), (2, 1, 3001, 12, 2, 64, 64, 2)],
    ids=_case_id,
)
def test_cuda_flash_parts_match_the_float32_reference(case, dtype):
    *_, d, bs, local = case
    q, k, v = _inputs(case, dtype, "cuda")
    rotary = SubquadRotary(d, 10000.0)
    got = dense_local_rotary_attention(q, k, v, d**-0.5, rotary, bs, local)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = dense_local_rotary_reference(q32, k32, v32, d**-0.5, rotary, bs, local)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(want)
    ours = torch.autograd.grad(got, (q, k, v), grad.to(dtype))
    theirs = torch.autograd.grad(want, (q32, k32, v32), grad)
    for a, b in zip(ours, theirs):
        scale = b.abs().max().item()
        assert (a.float() - b).abs().max().item() <= 3e-2 * scale + 1e-3
