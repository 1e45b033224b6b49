"""SSA decoding: routing equals select_blocks, per-row lengths, and the Triton split-K kernel."""

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

import subquad
from subquad.ops.ssa.triton_decode import decode_select, sparse_decode_naive, ssa_decode

CFG = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2)


@pytest.mark.parametrize("seq_len, heads", [(1, (4, 4)), (63, (4, 1)), (161, (8, 2)), (250, (8, 8))])
def test_decode_equals_last_token_of_full_attention(seq_len, heads):
    hq, hkv = heads
    q = torch.randn(2, 1, hq, 32)
    k, v = torch.randn(2, seq_len, hkv, 32), torch.randn(2, seq_len, hkv, 24)
    ref, sel = subquad.ssa_attention(q, k, v, config=CFG, return_selection=True)
    out, idx = ssa_decode(q, k, v, CFG, return_selection=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(idx.sort(-1).values, sel.block_idx[:, :, 0].sort(-1).values)


def test_decode_rows_of_different_lengths():
    q = torch.randn(3, 1, 4, 32)
    k, v = torch.randn(3, 200, 2, 32), torch.randn(3, 200, 2, 32)
    lens = torch.tensor([200, 77, 16])
    summ = subquad.block_summaries(k, 16)
    out = ssa_decode(q, k, v, CFG, seqlens=lens, summaries=summ)
    for row, n in enumerate(lens.tolist()):
        ref = subquad.ssa_attention(q[row : row + 1], k[row : row + 1, :n], v[row : row + 1, :n], config=CFG)
        torch.testing.assert_close(out[row : row + 1], ref)


def test_decode_select_and_reference_errors():
    q = torch.randn(1, 1, 4, 32)
    k = torch.randn(1, 40, 2, 32)
    with pytest.raises(ValueError, match="one token per row"):
        ssa_decode(torch.randn(1, 2, 4, 32), k, k, CFG)
    with pytest.raises(ValueError, match="seqlens"):
        ssa_decode(q, k, k, CFG, seqlens=torch.tensor([40, 40]))
    # Selection of an all-padding-free row: sink block 0, local blocks 1 and 2 (token 39 is in block 2).
    idx = decode_select(q[:, 0], subquad.block_summaries(k, 16), torch.tensor([40]), CFG)
    assert idx[0, 0].tolist()[:3] == [0, 1, 2]
    out = sparse_decode_naive(q[:, 0], k, k, idx, torch.tensor([40]), 16)
    assert torch.isfinite(out).all()


TRITON_CHECK = textwrap.dedent(
    """
    import torch, subquad
    from subquad.ops.ssa.triton_decode import (
        decode_plan, decode_select, decode_step, sparse_decode_naive, sparse_decode_triton,
    )
    torch.manual_seed(0)
    cfg = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2)
    for hq, hkv, d, dv, split in [(8, 2, 32, 32, 2), (4, 4, 16, 48, 1), (6, 1, 64, 64, None)]:
        q = torch.randn(3, hq, d).half()
        k = torch.randn(3, 150, hkv, d).half()
        v = torch.randn(3, 150, hkv, dv).half()
        lens = torch.tensor([150, 70, 5])
        idx = decode_select(q, subquad.block_summaries(k, 16), lens, cfg)
        out = sparse_decode_triton(q, k, v, idx, lens, 16, slots_per_split=split)
        ref = sparse_decode_naive(q.float(), k.float(), v.float(), idx, lens, 16)
        low = sparse_decode_naive(q, k, v, idx, lens, 16).float()
        err, base = (out.float() - ref).abs().max().item(), (low - ref).abs().max().item()
        assert err <= 2 * base + 1e-3, (hq, hkv, d, dv, err, base)
        # Strided cache views (a longer buffer) are read in place.
        big = torch.randn(3, 300, hkv, d).half(); big[:, :150] = k
        out2 = sparse_decode_triton(q, big[:, :150], v, idx, lens, 16, slots_per_split=split)
        assert torch.equal(out2, out)
        if split is None:
            # A model's decode step: the shared plan, no checks, the same kernel.
            summ = subquad.block_summaries(k, 16)
            plan = decode_plan(lens, summ.shape[1], cfg, lens.tolist())
            out3, idx3 = decode_step(q[:, None], k, v, summ, plan, cfg, d**-0.5, "triton")
            assert torch.equal(idx3, idx) and torch.equal(out3[:, 0], out)
    # More than 32 splits: the merge takes its partials 32 at a time and rescales the first chunk's
    # when a later one holds the largest score (a key planted in block 42, slot 42: the second chunk).
    q = torch.randn(1, 2, 16).half()
    k, v = torch.randn(1, 700, 1, 16).half(), torch.randn(1, 700, 1, 16).half()
    k[0, 42 * 16 + 3, 0] = q[0, 0] * 3
    idx, lens = torch.arange(43, dtype=torch.int32).view(1, 1, 43), torch.tensor([700])
    out = sparse_decode_triton(q, k, v, idx, lens, 16, slots_per_split=1)
    ref = sparse_decode_naive(q.float(), k.float(), v.float(), idx, lens, 16)
    low = sparse_decode_naive(q, k, v, idx, lens, 16).float()
    assert (out.float() - ref).abs().max().item() <= 2 * (low - ref).abs().max().item() + 1e-3
    print("ok")
    """
)


def test_triton_decode_kernel_interpreted():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before the kernels are defined: run in a fresh interpreter.
    # fp16 only: triton 3.6's CPU interpreter computes bf16 tl.dot wrongly (an interpreter issue).
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
def test_decode_select_matches_full_routing_per_row(index):
    # Each row's newest token must get the selection a full forward over that row gives it, for
    # both routers (the tree's grouping depends on the row's own length).
    config = subquad.SSAConfig(block_size=16, top_k=3, index=index, tree_group=2)
    lengths = [400, 257, 130]
    q = torch.randn(len(lengths), 400, 4, 16)
    k = torch.randn(len(lengths), 400, 2, 16)
    num_blocks = -(-400 // 16)
    summaries = torch.zeros(len(lengths), num_blocks, 2, 16)
    for b, n in enumerate(lengths):
        own = subquad.block_summaries(k[b : b + 1, :n], 16)[0]
        summaries[b, : own.shape[0]] = own
    newest = torch.stack([q[b, n - 1] for b, n in enumerate(lengths)])
    got = decode_select(newest, summaries, torch.tensor(lengths), config)
    for b, n in enumerate(lengths):
        want = subquad.select_blocks(q[b : b + 1, n - 1 : n], k[b : b + 1, :n], config).block_idx[0, :, 0]
        assert torch.equal(got[b].sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
def test_shared_plan_and_kept_bounds_route_like_the_reference(index):
    # A model's decode step builds one plan for all layers (reused while rows stay in their blocks) and
    # keeps the tree's group bounds or the beam's node bounds in the cache layer; the picks must equal
    # routing each step afresh (select_blocks on the whole row), across group-size changes, level-1 and
    # level-2 nodes completing (the beam's nodes of 2 and 4 blocks) and a crop.
    from subquad.cache import SSACacheLayer
    from subquad.ops.ssa.triton_decode import decode_plan, kept_index

    tree_group = 2 if index == "beam" else None
    config = subquad.SSAConfig(
        block_size=16, top_k=3, sink_blocks=1, local_blocks=2, index=index, tree_group=tree_group
    )
    layer = SSACacheLayer(block_size=16)
    keys = torch.randn(2, 700, 2, 16)
    layer.append(keys[:, :40], keys[:, :40])
    plan = None
    for step in range(40, 700):
        layer.append(keys[:, step : step + 1], keys[:, step : step + 1])
        if step == 500:
            layer.crop(-100)
        n = layer.lengths[0]
        summaries = layer.summaries()
        q = torch.randn(2, 4, 16)
        seqlens = torch.full((2,), n)
        plan = decode_plan(seqlens, summaries.shape[1], config, [n, n], previous=plan)
        got = decode_select(q, summaries, seqlens, config, plan, kept_index(layer.derived, config))
        want = subquad.select_blocks(q[:, None], layer.keys_bshd(), config).block_idx[:, :, 0]
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), n
    if index != "flat":  # kept by the cache until something rewrites its tokens
        kept = kept_index(layer.derived, config)
        assert (kept.done if index == "tree" else kept.done[1]) > 0  # bounds were kept, not rebuilt
        layer.reorder_cache(torch.tensor([1, 0]))
        assert not layer.derived


def test_kept_beam_levels_equal_the_reference_levels():
    # The kept node bounds equal select.beam_levels on every node before the token's window (the only
    # ones it may probe), as they grow past their capacity, with sink blocks inside the first nodes.
    from subquad.ops.ssa.select import beam_levels
    from subquad.ops.ssa.triton_decode import BeamLevels

    config = subquad.SSAConfig(
        block_size=16, top_k=2, sink_blocks=3, local_blocks=3, index="beam", tree_group=2
    )
    summaries = torch.randn(2, 700, 3, 5)
    kept = BeamLevels()
    for length in (1, 33, 160, 161, 1200, 1201, 4400, 11199, 11200):
        num_blocks = -(-length // 16)
        got = kept.levels(summaries[:, :num_blocks], length, config)
        want = beam_levels(summaries[:, :num_blocks], config)
        window = max((length - 1) // 16 - 2, 0)
        for level, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape
            done = window // 2 ** (level + 1)
            assert torch.equal(g[:, :done], w[:, :done]), (length, level)
            assert not g[:, done:].any()  # not yet bounded: zeros, never probed
    assert kept.tables[0].shape[1] >= 350


TREE_DECODE_STEPS = (20, 150, 700, 1076, 1500, 2199)  # group size 2 -> 8; 1076: a crop


@pytest.mark.parametrize(
    "top_k, heads, steps",
    [(3, (4, 2), TREE_DECODE_STEPS), (20, (3, 1), (2199,))],
    ids=["k3-gqa2", "k20-gqa3"],
)
def test_triton_tree_decode_routing_matches_torch(top_k, heads, steps):
    # The two-kernel tree step (triton_select.decode_route_tree) against the PyTorch step on the same
    # plan and kept bounds: group sizes 2..8, no probe-able group yet, probe > 16 (k20), a crop.
    pytest.importorskip("triton")
    from subquad.cache import SSACacheLayer
    from subquad.ops.ssa.triton_decode import TreeBounds, decode_plan

    torch.manual_seed(5)
    heads_q, heads_kv = heads
    config = subquad.SSAConfig(block_size=16, top_k=top_k, sink_blocks=1, local_blocks=2, index="tree")
    layer = SSACacheLayer(block_size=16)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton's interpreter
    keys = torch.randn(2, 2200, heads_kv, 16, device=device)
    layer.append(keys[:, :20], keys[:, :20])
    bounds, plan, end = TreeBounds(), None, 20
    # 1-5 s a step in the CPU interpreter: a few lengths, not every step.
    for step in steps:
        layer.append(keys[:, end : step + 1], keys[:, end : step + 1])
        end = step + 1
        if step == 1076:
            layer.crop(-300)
            end -= 300
            bounds = layer.derived.setdefault("tree_bounds", TreeBounds())
        n = layer.lengths[0]
        summaries = layer.summaries()
        seqlens = torch.full((2,), n, device=device)
        plan = decode_plan(seqlens, summaries.shape[1], config, [n, n], previous=plan)
        # Random queries, and queries aimed at the last routable block: it sits in one of the groups
        # touching the window, which are expanded block by block rather than probed by bound.
        target = summaries[:, max(0, (n - 1) // 16 - 2)].repeat_interleave(heads_q // heads_kv, dim=1)
        noise = torch.randn(2, 2, heads_q, 16, device=device)
        for q in (noise[0], 10 * target + 0.1 * noise[1]):
            args = (q, summaries, seqlens, config, plan, bounds)
            got, syncs = _host_syncs(decode_select, *args, backend="triton")
            want = decode_select(*args)
            assert got.shape == want.shape and syncs == (0, 0), n
            assert torch.equal(got[..., :3], want[..., :3]), n  # sink and local slots, in place
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), n


def _host_syncs(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its (scalar reads, tolist calls): each a device-to-host sync on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        scalars = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_local_scalar_dense"):
                Count.scalars += 1
            return func(*args, **(kwargs or {}))

    calls = []
    original = torch.Tensor.tolist

    def tolist(t, *a, **k):
        calls.append(t.shape)
        return original(t, *a, **k)

    torch.Tensor.tolist = tolist
    try:
        with Count():
            out = fn(*args, **kwargs)
    finally:
        torch.Tensor.tolist = original
    return out, (Count.scalars, len(calls))


@pytest.mark.parametrize("index", ["flat", "tree", "beam"])
@pytest.mark.parametrize("ragged", [False, True])
def test_model_decode_step_matches_full_forward_without_host_syncs(index, ragged):
    # Rows of different lengths (a left-padded batch) decode in one batched step; each row's logits
    # equal a full forward over that row alone, and the step never reads a device value on the host.
    from subquad.models import SubquadConfig, SubquadForCausalLM

    tree_group = 2 if index == "beam" else None  # nodes of 8 blocks would hold all 10: it would route flat
    ssa = {"block_size": 16, "top_k": 2, "index": index, "tree_group": tree_group}
    cfg = SubquadConfig.from_flavor("debug", position_scheme="rope", ssa=ssa)
    model = SubquadForCausalLM(cfg).eval()
    lengths = [150, 93] if ragged else [150, 150]
    rows = [torch.randint(0, 256, (1, n + 4)) for n in lengths]
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, max(lengths) - n :] = row[0, :n]
        mask[r, max(lengths) - n :] = 1
    with torch.no_grad():
        cache = model(ids, attention_mask=mask if ragged else None, use_cache=True).past_key_values
        assert cache.layers[0].lengths == lengths
        for i in range(4):
            token = torch.stack([row[0, n + i] for row, n in zip(rows, lengths)])[:, None]
            out, syncs = _host_syncs(model, token, past_key_values=cache)
            assert syncs == (0, 0)
            for r, (row, n) in enumerate(zip(rows, lengths)):
                ref = model(row[:, : n + i + 1], use_cache=False).logits[:, -1]
                torch.testing.assert_close(out.logits[r, -1], ref[0], atol=2e-5, rtol=1e-4)
        # Cropped back by 20 tokens (into earlier blocks): the kept plan and bounds must not be reused.
        assert "decode_plan" in cache.layers[0].derived
        cache.crop(-20)
        assert "decode_plan" not in cache.layers[0].derived
        token = torch.stack([row[0, n - 16] for row, n in zip(rows, lengths)])[:, None]
        out = model(token, past_key_values=cache)
        for r, (row, n) in enumerate(zip(rows, lengths)):
            ref = model(row[:, : n - 15], use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[r, -1], ref[0], atol=2e-5, rtol=1e-4)


def _fused_step_inputs(batch, heads, dim, block_size, held, dtype, device):
    """A cache layer's buffers holding ``held`` random tokens a row (and room for the next one), the q/k/v
    projection of the next token and rotary tables of its key block."""
    from subquad.cache import SSACacheLayer

    heads_q, heads_kv = heads
    layer = SSACacheLayer(block_size=block_size)
    kv = torch.randn(2, batch, held, heads_kv, dim, device=device).to(dtype)
    layer.append(kv[0], kv[1])
    layer._ensure_capacity(held + 1)
    qkv = torch.randn(batch, 1, heads_q + 2 * heads_kv, dim, device=device).to(dtype)
    angles = torch.rand(block_size, dim // 2, device=device) * 6.3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pos = torch.tensor([held], device=device)
    return qkv, cos, sin, pos, layer._key_buf, layer._value_buf, layer._means


@pytest.mark.parametrize("index", ["flat", "tree"])
@pytest.mark.parametrize(
    "heads, top_k, held, lists, tile",
    [((4, 2), 3, 700, 2, 16), ((3, 1), 20, 300, 4, 32), ((4, 2), 3, 704, 1, 16), ((2, 2), 2, 20, 3, 16)],
    ids=["two-tiles-a-list", "fewer-candidates-than-k", "block-opens", "no-candidates"],
)
def test_fused_decode_step_matches_reference(index, heads, top_k, held, lists, tile, poison_empty):
    # The fused step (the append in the routing's first kernel, split-K attention picking the selection
    # from the routing's lists, merge) against the append reference and the PyTorch decode step: the
    # same cache writes and selection, the attention output to kernel precision. fp16 on the CPU (the
    # interpreter's bf16 tl.dot is wrong). lists and tile shape the flat router's launch.
    pytest.importorskip("triton")
    from subquad.ops.ssa.triton_decode import decode_plan, fused_decode_step

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton's interpreter
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    config = subquad.SSAConfig(block_size=16, top_k=top_k, sink_blocks=1, local_blocks=2, index=index)
    inputs = _fused_step_inputs(2, heads, 16, 16, held, dtype, device)
    ref_inputs = [t.clone() for t in inputs]
    seqlens = torch.full((2,), held + 1, device=device, dtype=torch.int32)
    plan = decode_plan(seqlens, held // 16 + 1, config, [held + 1] * 2)
    out, idx = fused_decode_step(*inputs, plan, config, 0.3, "triton", route_lists=lists, route_tile=tile)
    want, want_idx = fused_decode_step(*ref_inputs, plan, config, 0.3, "torch")
    for got_buf, want_buf in zip(inputs[4:6], ref_inputs[4:6]):
        assert torch.equal(got_buf, want_buf)
    torch.testing.assert_close(inputs[6], ref_inputs[6], atol=1e-6, rtol=1e-6)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=1e-2)


def test_fused_tree_step_takes_its_key_block_from_the_position():
    # A graphed step replays the fused tree step's launch in later key blocks (GraphedDecoder): the
    # routing kernel reads the window from pos and the attention the whole buffers, so a plan of an
    # earlier block with the same layout, given the new block's sink and local slots, lengths and kept
    # bounds (what the decoder rewrites for each block), routes and attends as the new block's own plan.
    pytest.importorskip("triton")
    from subquad.ops import fused
    from subquad.ops.ssa.triton_decode import (
        TreeBounds,
        decode_plan,
        fused_decode_step,
        fused_step_layout,
        tree_step_bounds,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton's interpreter
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    config = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2, index="tree",
                               tree_group=2)  # fmt: skip
    held, earlier = 700, 645  # key blocks 43 and 40: windows from group 21 and 19, one layout
    inputs = _fused_step_inputs(2, (4, 2), 16, 16, held, dtype, device)
    # Blocks 39-41 routable from block 43 only (block 40's window starts at 39), summaries planted along
    # the routing query (the sum of a KV head's rotated query heads): the new block's picks.
    q = fused.rotate_append_decode_token_reference(*[t.clone() for t in inputs])
    rq = q[:, 0].float().view(2, 2, 2, 16).sum(2)
    scale = torch.tensor([10.0, 12.0, 14.0], device=device)[None, :, None, None]
    inputs[6][:, 39:42] = scale * rq[:, None] / rq.norm(dim=-1, keepdim=True)[:, None]
    ref_inputs = [t.clone() for t in inputs]
    plans = {}
    for n in (held, earlier):
        seqlens = torch.full((2,), n + 1, device=device, dtype=torch.int32)
        plans[n] = decode_plan(seqlens, n // 16 + 1, config, [n + 1] * 2)
    fresh, stale = plans[held], plans[earlier]
    assert fused_step_layout(stale, config, "triton") == fused_step_layout(fresh, config, "triton")
    assert stale.tree.window_first != fresh.tree.window_first
    kept = TreeBounds()
    tree_step_bounds(inputs[6][:, : fresh.num_blocks], fresh.tree, config, kept)
    stale = replace(stale, seqlens=fresh.seqlens, fixed=fresh.fixed)
    out, idx = fused_decode_step(*inputs, stale, config, 0.3, "triton", kept=kept)
    want, want_idx = fused_decode_step(*ref_inputs, fresh, config, 0.3, "torch")
    for got_buf, want_buf in zip(inputs[4:6], ref_inputs[4:6]):
        assert torch.equal(got_buf, want_buf)
    assert torch.equal(idx, want_idx) and set(range(39, 42)) <= set(idx[0, 0].tolist())
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=1e-2)
    # The flat step's launch depends on the block count, and the PyTorch path's on everything.
    flat = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2, index="flat")
    flat_plan = decode_plan(fresh.seqlens, fresh.num_blocks, flat, fresh.lengths)
    assert fused_step_layout(flat_plan, flat, "triton") is None
    assert fused_step_layout(fresh, config, "torch") is None


def test_fused_decode_step_rejects_bad_arguments():
    pytest.importorskip("triton")
    from subquad.ops.ssa.triton_decode import decode_plan, fused_decode_step

    config = subquad.SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2)
    inputs = _fused_step_inputs(1, (2, 1), 16, 16, 100, torch.float16, "cpu")
    plan = decode_plan(torch.full((1,), 101, dtype=torch.int32), 7, config, [101])
    for tile in (24, 8):
        with pytest.raises(ValueError, match=f"route_tile={tile}: expected a power of two >= 16"):
            fused_decode_step(*inputs, plan, config, 0.3, "triton", route_tile=tile)
    with pytest.raises(ValueError, match="route_lists=0"):
        fused_decode_step(*inputs, plan, config, 0.3, "triton", route_lists=0)
    short = (inputs[0], inputs[1][:8], inputs[2][:8], *inputs[3:])
    with pytest.raises(ValueError, match=r"cos: shape \(8, 16\), expected 16 rows"):
        fused_decode_step(*short, plan, config, 0.3, "triton")
