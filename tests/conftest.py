"""Shared test setup: a fixed seed per test, NaN-poisoned allocations, full-matrix attention references."""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before Triton
# is first imported (kernels are bound to it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    # Each test draws its own fixed inputs, independent of which other tests ran before it.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``torch.empty_like``/``Tensor.new_empty`` return NaN-filled float tensors.

    A kernel (or reference) that allocates its output with ``empty`` and leaves a block unwritten
    then fails the comparison instead of passing on whatever the allocator happened to hand back.
    """
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **kw: poison(real_new_empty(self, *a, **kw))
    )
    yield


def attention_reference(q, k, v, causal=True, scale=None, mask=None, upcast=True):
    """Attention from the full ``[B, Hq, T, S]`` score matrix, the textbook way.

    ``mask`` (bool, broadcastable to ``[B, Hq, T, S]``) keeps only the True keys; rows left empty give 0
    (the sparse operator's convention). ``upcast=False`` computes in the input dtype (the low-precision
    baseline of the flash-attn tolerance rule); otherwise in float32. Returns ``q.dtype`` when not
    upcast, float32 otherwise.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    seq_len_q, heads_q, dim = q.shape[1], q.shape[2], q.shape[3]
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    group = heads_q // heads_kv
    keys = k.repeat_interleave(group, dim=2)
    values = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q * scale, keys)
    visible = torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(seq_len_q, device=q.device) + (seq_len_k - seq_len_q)
        visible = torch.arange(seq_len_k, device=q.device)[None, :] <= query_pos[:, None]
    if mask is not None:
        visible = visible & mask
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(values.dtype)
    out = torch.einsum("bhts,bshd->bthd", probs, values)
    return out if upcast else out.to(dtype)


def selection_mask(block_idx, block_size, seq_len_k, heads_q):
    """Key mask ``[B, Hq, T, S]`` (bool) holding exactly the keys of each token's selected blocks."""
    batch, heads_kv, seq_len_q, _ = block_idx.shape
    num_blocks = -(-seq_len_k // block_size)
    idx = block_idx.long()
    # Unused slots (-1) scatter into a spare column that is dropped afterwards.
    idx = torch.where(idx >= 0, idx, num_blocks)
    blocks = torch.zeros(batch, heads_kv, seq_len_q, num_blocks + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, idx, True)
    keys = blocks[..., :num_blocks].repeat_interleave(block_size, dim=-1)[..., :seq_len_k]
    return keys.repeat_interleave(heads_q // heads_kv, dim=1)


@pytest.fixture
def reference():
    """``reference.attention(...)`` and ``reference.selection_mask(...)`` (see their docstrings)."""
    return SimpleNamespace(attention=attention_reference, selection_mask=selection_mask)


@pytest.fixture
def load_script():
    """``load_script("scripts/oracle_routing.py")``: a repository script (not a package module) loaded
    as a module from its path relative to the repository root."""

    def load(relative: str):
        path = Path(__file__).resolve().parents[1] / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def backward_twice():
    """``backward_twice(out, leaves)``: backward through ``out`` twice (``retain_graph`` on the first)
    and check the second pass adds the same gradients to ``leaves`` as the first."""

    def check(out: torch.Tensor, leaves: list[torch.Tensor]) -> None:
        do = torch.randn_like(out)
        out.backward(do, retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        out.backward(do)
        for name, once, twice in zip("qkv", first, (t.grad for t in leaves), strict=True):
            assert torch.allclose(twice.float(), 2 * once.float(), atol=2e-3, rtol=1e-2), name

    return check


# Tensor methods that hand a device value to Python: on a GPU each waits for the queued kernels.
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        # ``t[i] = 3`` copies a host scalar in; a boolean-mask index counts its True entries first.
        writes_number = name == "__setitem__" and isinstance(args[2], (bool, int, float))
        index = args[1] if name in ("__getitem__", "__setitem__") else None
        masks = any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (index if isinstance(index, tuple) else (index,))
        )
        counts = name == "repeat_interleave" and isinstance(args[1], torch.Tensor)
        counts = counts and "output_size" not in kwargs
        if name in _HOST_READS or writes_number or masks or counts:
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.fixture
def host_reads():
    """``with host_reads() as reads: ...``: ``reads.calls`` lists the torch calls in the block that would
    make the host wait for the GPU (``.item()``, ``nonzero``, ``bool(t)``, ``t[i] = 3``, ...), seen on
    any device, so a CPU test can check that a prefill step queues its work without a sync."""
    return _HostReads
