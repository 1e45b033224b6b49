"""Every user mistake raises a ValueError/TypeError naming the argument, the value and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

from subquad import (
    SSAConfig,
    SSASelection,
    attention_recall,
    block_summaries,
    dense_attention,
    select_blocks,
    ssa_attention,
)

CONFIG = SSAConfig(block_size=16, top_k=2)


def qkv(
    batch=1, seq_len_q=40, seq_len_k=40, heads_q=4, heads_kv=2, dim=16, dtype=torch.float32, device="cpu"
):
    q = torch.randn(batch, seq_len_q, heads_q, dim, dtype=dtype, device=device)
    k = torch.randn(batch, seq_len_k, heads_kv, dim, dtype=dtype, device=device)
    v = torch.randn(batch, seq_len_k, heads_kv, dim, dtype=dtype, device=device)
    return q, k, v


def attention_calls():
    """The three public entry points that take q, k, v (recall takes q, k and a selection)."""

    def recall(q, k, v, **kw):
        # q, k are checked before the selection, so any selection will do here.
        sel = SSASelection(torch.full((1, 2, 40, 1), -1, dtype=torch.int32), 16)
        return attention_recall(q, k, sel, **kw)

    return {
        "ssa": lambda q, k, v, **kw: ssa_attention(q, k, v, CONFIG, **kw),
        "dense": dense_attention,
        "select": lambda q, k, v, **kw: select_blocks(q, k, CONFIG, **kw),
        "recall": recall,
    }


ENTRY_POINTS = attention_calls()
QKV_ENTRY_POINTS = ["ssa", "dense"]


def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# q, k, v


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_wrong_rank(entry):
    q, k, v = qkv()
    with raises(ValueError, "q", "4 dims", "(40, 4, 16)"):
        ENTRY_POINTS[entry](q[0], k, v)
    with raises(ValueError, "k", "4 dims", "(1, 40, 2, 16, 1)"):
        ENTRY_POINTS[entry](q, k[..., None], v)


@pytest.mark.parametrize("entry", QKV_ENTRY_POINTS)
def test_wrong_rank_v(entry):
    q, k, v = qkv()
    with raises(ValueError, "v", "4 dims", "(40, 2, 16)"):
        ENTRY_POINTS[entry](q, k, v[0])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_not_a_tensor(entry):
    q, k, v = qkv()
    with raises(TypeError, "q", "torch.Tensor", "list"):
        ENTRY_POINTS[entry](q.tolist(), k, v)


@pytest.mark.parametrize("entry", QKV_ENTRY_POINTS)
def test_shape_mismatches(entry):
    call = ENTRY_POINTS[entry]
    q, k, v = qkv()
    with raises(ValueError, "batch", "q 2", "k 1"):
        call(torch.cat([q, q]), k, v)
    with raises(ValueError, "k and v lengths", "k 40", "v 39"):
        call(q, k, v[:, :39])
    with raises(ValueError, "k and v head counts", "k 2", "v 1"):
        call(q, k, v[:, :, :1])
    with raises(ValueError, "head dims", "q 16", "k 8"):
        call(q, k[..., :8], v)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_heads_not_a_multiple(entry):
    q, k, v = qkv(heads_q=4, heads_kv=3)
    with raises(ValueError, "q heads (4)", "k/v heads (3)", "multiple"):
        ENTRY_POINTS[entry](q, k, v)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_more_queries_than_keys_when_causal(entry):
    q, k, v = qkv(seq_len_q=41, seq_len_k=40)
    with raises(ValueError, "q length 41", "k length 40", "T <= S"):
        ENTRY_POINTS[entry](q, k, v, causal=True)


@pytest.mark.parametrize("entry", QKV_ENTRY_POINTS)
def test_mixed_dtypes(entry):
    q, k, v = qkv()
    with raises(TypeError, "mixed dtypes", "torch.float32", "torch.bfloat16"):
        ENTRY_POINTS[entry](q, k.to(torch.bfloat16), v)


@pytest.mark.parametrize("entry", QKV_ENTRY_POINTS)
def test_mixed_devices(entry):
    q, k, v = qkv()
    with raises(ValueError, "different devices", "cpu", "meta"):
        ENTRY_POINTS[entry](q, k, v.to("meta"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float64], ids=str)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unsupported_dtype(entry, dtype):
    q, k, v = qkv()
    with raises(TypeError, "q", str(dtype), "not supported"):
        ENTRY_POINTS[entry](q.to(dtype), k.to(dtype), v.to(dtype))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_empty_tensor(entry):
    q, k, v = qkv()
    with raises(ValueError, "q", "empty", "(1, 0, 4, 16)"):
        ENTRY_POINTS[entry](q[:, :0], k, v)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_causal_must_be_bool(entry):
    q, k, v = qkv()
    with raises(TypeError, "causal=1", "bool"):
        ENTRY_POINTS[entry](q, k, v, causal=1)


@pytest.mark.parametrize("entry", ["ssa", "dense", "recall"])
@pytest.mark.parametrize(
    "scale,exc",
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
    ids=["zero", "negative", "inf", "nan", "str", "bool", "tensor"],
)
def test_bad_scale(entry, scale, exc):
    q, k, v = qkv()
    with raises(exc, f"scale={scale!r}"):
        ENTRY_POINTS[entry](q, k, v, scale=scale)


# backends


@pytest.mark.parametrize("backend", ["cuda", "Torch", "flash", None])
def test_bad_backend_name(backend):
    q, k, v = qkv()
    with raises(ValueError, f"backend={backend!r}", "'auto'", "'torch'", "'triton'"):
        ssa_attention(q, k, v, CONFIG, backend=backend)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(dtype=torch.bfloat16)
    with raises(ValueError, "backend='triton'", "cpu", "CUDA", "TRITON_INTERPRET=1", "backend='torch'"):
        ssa_attention(q, k, v, CONFIG, backend="triton")


def test_triton_dtype_and_head_dim_limits_say_why(monkeypatch):
    # Under the interpreter the device is fine; dtype and head size are still checked up front.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv()
    with raises(ValueError, "backend='triton'", "torch.float32", "float16 or bfloat16"):
        ssa_attention(q, k, v, CONFIG, backend="triton")
    q, k, v = qkv(dim=8, dtype=torch.bfloat16)
    with raises(ValueError, "backend='triton'", "head dim=8", "16 <= D"):
        ssa_attention(q, k, v, CONFIG, backend="triton")
    q, k, v = qkv(dim=16, dtype=torch.bfloat16)
    with raises(ValueError, "v head dim=512"):
        ssa_attention(q, k, torch.randn(1, 40, 2, 512, dtype=torch.bfloat16), CONFIG, backend="triton")


def test_auto_backend_on_cpu_runs_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(dtype=torch.bfloat16)
    out = ssa_attention(q, k, v, CONFIG, backend="auto")
    torch.testing.assert_close(out, ssa_attention(q, k, v, CONFIG, backend="torch"), atol=0, rtol=0)


# SSAConfig


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        ({"block_size": 48}, ValueError, ["block_size=48", "power of two"]),
        ({"block_size": 8}, ValueError, ["block_size=8", ">= 16"]),
        ({"block_size": 0}, ValueError, ["block_size=0"]),
        ({"block_size": 64.0}, TypeError, ["block_size=64.0", "int"]),
        ({"block_size": "64"}, TypeError, ["block_size='64'", "int"]),
        ({"top_k": -1}, ValueError, ["top_k=-1", ">= 0"]),
        ({"top_k": True}, TypeError, ["top_k=True", "int"]),
        ({"sink_blocks": -2}, ValueError, ["sink_blocks=-2", ">= 0"]),
        ({"sink_blocks": False}, TypeError, ["sink_blocks=False", "int"]),
        ({"local_blocks": 0}, ValueError, ["local_blocks=0", ">= 1"]),
        ({"local_blocks": 2.5}, TypeError, ["local_blocks=2.5", "int"]),
        ({"index": "Flat"}, ValueError, ["index='Flat'", "'flat'", "'tree'"]),
        ({"index": "ivf"}, ValueError, ["index='ivf'"]),
        ({"summary": "median"}, ValueError, ["summary='median'", "'mean'", "'max'"]),
        ({"summary": "max"}, ValueError, ["summary='max' needs sub_block_size"]),
        ({"tree_group": 1}, ValueError, ["tree_group=1", ">= 2"]),
        ({"tree_group": True}, TypeError, ["tree_group=True", "int"]),
        ({"tree_probe": 0}, ValueError, ["tree_probe=0", ">= 1"]),
        ({"index": "beam", "tree_group": 6}, ValueError, ["tree_group=6", "'beam'", "power of two"]),
        ({"index": "beam", "summary": "max", "sub_block_size": 16}, ValueError, ["index='beam'", "'flat'"]),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_config_values(kwargs, exc, fragments):
    with raises(exc, *fragments):
        SSAConfig(**kwargs)


def test_config_is_frozen_and_round_trips():
    config = SSAConfig(block_size=32, top_k=5, index="tree", tree_group=4)
    assert SSAConfig.from_dict(config.to_dict()) == config
    assert SSAConfig.from_dict(None) == SSAConfig()
    assert SSAConfig.from_dict(config) is config
    assert config.blocks_per_query == 1 + 2 + 5 and config.max_keys == 8 * 32
    with pytest.raises(AttributeError):
        config.top_k = 3


def test_config_from_dict_unknown_keys():
    with raises(ValueError, "unknown field", "['blocksize', 'topk']", "block_size"):
        SSAConfig.from_dict({"blocksize": 64, "topk": 3, "index": "flat"})


def test_config_from_dict_bad_values_and_types():
    with raises(ValueError, "top_k=-3"):
        SSAConfig.from_dict({"top_k": -3})
    with raises(TypeError, "dict or SSAConfig", "list"):
        SSAConfig.from_dict([("top_k", 3)])


@pytest.mark.parametrize("entry", ["ssa", "select"])
def test_config_wrong_type(entry):
    q, k, v = qkv()
    call = ssa_attention if entry == "ssa" else select_blocks
    args = (q, k, v) if entry == "ssa" else (q, k)
    with raises(TypeError, "config", "SSAConfig", "dict"):
        call(*args, config={"block_size": 16})


# selections and summaries


def valid_selection(q, k, config=CONFIG):
    return select_blocks(q, k, config)


@pytest.mark.parametrize("entry", ["ssa", "recall"])
def test_bad_selection(entry):
    q, k, v = qkv()

    def call(sel):
        if entry == "ssa":
            return ssa_attention(q, k, v, CONFIG, selection=sel)
        return attention_recall(q, k, sel)

    good = valid_selection(q, k)
    call(good)
    with raises(TypeError, "selection", "SSASelection", "Tensor"):
        call(good.block_idx)
    with raises(ValueError, "selection.block_idx", "(1, 2, 39, 5)", "(1, 2, 40, 'K')"):
        call(SSASelection(good.block_idx[:, :, :39], 16))
    with raises(ValueError, "selection.block_idx", "(2, 40, 5)"):
        call(SSASelection(good.block_idx[0], 16))
    with raises(ValueError, "selection.block_idx", "(1, 4, 40, 5)"):
        call(SSASelection(torch.cat([good.block_idx, good.block_idx], 1), 16))
    with raises(TypeError, "selection.block_idx", "torch.int64", "torch.int32"):
        call(SSASelection(good.block_idx.long(), 16))
    with raises(TypeError, "selection.block_idx", "torch.Tensor", "list"):
        call(SSASelection(good.block_idx.tolist(), 16))
    past_the_end = good.block_idx.clone()
    past_the_end[..., -1] = 3  # 40 keys make blocks 0, 1, 2
    with raises(ValueError, "selection.block_idx", "[-1, 2]"):
        call(SSASelection(past_the_end, 16))
    with raises(ValueError, "selection.block_idx", "[-1, 2]"):
        call(SSASelection(torch.full_like(good.block_idx, -2), 16))
    with raises(ValueError, "selection.block_idx", "repeats block 0"):
        call(SSASelection(torch.zeros_like(good.block_idx), 16))
    with raises(ValueError, "selection.block_idx", "on meta", "cpu"):
        call(SSASelection(good.block_idx.to("meta"), 16))
    for block_size, exc in ((0, ValueError), (-16, ValueError), (16.0, TypeError)):
        with raises(exc, f"selection.block_size={block_size!r}"):
            call(SSASelection(good.block_idx, block_size))


def test_bad_summaries():
    q, k, v = qkv()
    good = block_summaries(k, 16)
    ssa_attention(q, k, v, CONFIG, summaries=good)
    with raises(ValueError, "summaries", "(1, 2, 3, 16)", "(1, 3, 2, 16)"):
        ssa_attention(q, k, v, CONFIG, summaries=good.transpose(1, 2))
    with raises(ValueError, "summaries", "list"):
        ssa_attention(q, k, v, CONFIG, summaries=good.tolist())
    with raises(TypeError, "summaries", "torch.int64"):
        ssa_attention(q, k, v, CONFIG, summaries=good.long())
    with raises(ValueError, "summaries", "meta", "cpu"):
        ssa_attention(q, k, v, CONFIG, summaries=good.to("meta"))
    with raises(ValueError, "summaries", "(1, 2, 2, 16)"):
        select_blocks(q, k, CONFIG, summaries=good[:, :2])


def test_bad_block_summaries_arguments():
    k = torch.randn(1, 40, 2, 16)
    with raises(ValueError, "block_size=0"):
        block_summaries(k, 0)
    with raises(TypeError, "block_size=16.0"):
        block_summaries(k, 16.0)
    with raises(ValueError, "k", "4 dims", "(40, 2, 16)"):
        block_summaries(k[0], 16)


# attention_recall options


@pytest.mark.parametrize(
    "max_queries", [0, -3, 2.5, True, "10"], ids=["zero", "negative", "float", "bool", "str"]
)
def test_bad_max_queries(max_queries):
    q, k, _ = qkv()
    with raises((ValueError, TypeError), f"max_queries={max_queries!r}", "positive int"):
        attention_recall(q, k, valid_selection(q, k), max_queries=max_queries)


def test_bad_reduction():
    q, k, _ = qkv()
    with raises(ValueError, "reduction='sum'", "'mean'", "'none'"):
        attention_recall(q, k, valid_selection(q, k), reduction="sum")
