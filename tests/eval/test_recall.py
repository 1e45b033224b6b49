"""Attention recall of a model's own selections (``subquad.eval.recall``) against full-matrix references."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from subquad.eval.recall import local_rope_recall, main, model_attention_recall, oracle_recall, query_rows
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.ops.ssa import SSAConfig
from subquad.ops.ssa.select import SSASelection, select_blocks

SCHEMES = ("rope", "local_rope")


def _model(scheme: str, ssa: dict | None = None, attention: str = "ssa", **overrides) -> SubquadForCausalLM:
    """The debug flavor (block 16) with sharp random attention: larger q/k weights than the init gives."""
    config = SubquadConfig.from_flavor(
        "debug", position_scheme=scheme, attention=attention, ssa=ssa or {}, **overrides
    )
    model = SubquadForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0, 0.4)
    return model


def _selection_mask(block_idx, block_size, seq_len, heads_q):
    """``[B, Hq, T, S]`` bool: the keys of each token's selected blocks."""
    num_blocks = -(-seq_len // block_size)
    idx = block_idx.long()
    idx = torch.where(idx >= 0, idx, num_blocks)
    blocks = torch.zeros(*idx.shape[:3], num_blocks + 1, dtype=torch.bool).scatter_(-1, idx, True)
    keys = blocks[..., :num_blocks].repeat_interleave(block_size, dim=-1)[..., :seq_len]
    return keys.repeat_interleave(heads_q // block_idx.shape[1], dim=1)


def _scores(q, k, group, scale):
    """Full ``[B, Hq, T, S]`` scores (k repeated over its query-head group)."""
    return torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(group, dim=2)) * scale


def _brute_oracle(probs, block_size, sink_blocks, local_blocks, top_k, heads_kv):
    """``[B, Hq, T]`` oracle recall from full ``[B, Hq, T, S]`` probabilities (query ``i`` at position
    ``S - T + i``), row by row: the forced sink and local blocks, plus the ``top_k`` other causal
    blocks with the largest mass averaged over the KV head's query heads (sorted by hand)."""
    batch, heads_q, seq_len_q, seq_len_k = probs.shape
    group = heads_q // heads_kv
    num_blocks = -(-seq_len_k // block_size)
    padded = torch.nn.functional.pad(probs, (0, num_blocks * block_size - seq_len_k))
    mass = padded.view(batch, heads_q, seq_len_q, num_blocks, block_size).sum(-1).tolist()
    out = torch.zeros(batch, heads_q, seq_len_q)
    for b, h, t in itertools.product(range(batch), range(heads_kv), range(seq_len_q)):
        qblock = (seq_len_k - seq_len_q + t) // block_size
        heads = range(h * group, (h + 1) * group)
        forced = [j for j in range(qblock + 1) if j < sink_blocks or j > qblock - local_blocks]
        others = [j for j in range(qblock + 1) if j not in forced]
        shared = {j: sum(mass[b][g][t][j] for g in heads) / group for j in others}
        chosen = forced + sorted(others, key=lambda j: -shared[j])[:top_k]
        for g in heads:
            out[b, g, t] = sum(mass[b][g][t][j] for j in chosen)
    return out


def _reference(model: SubquadForCausalLM, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``[B, Hq, T]`` recall and oracle recall from the full ``T x S`` score matrix, q/k
    rebuilt from the weights.

    ``local_rope``: keys in blocks ``[block(i) - local_blocks + 1, block(i)]`` are scored with rotated
    q/k, all other causal keys with unrotated q/k, in one softmax.
    """
    config = model.config
    ssa = config.ssa_config
    bs = ssa.block_size
    with torch.no_grad():
        hidden = model(input_ids=input_ids, use_cache=False, output_hidden_states=True).hidden_states
    batch, seq_len = input_ids.shape
    positions = torch.arange(seq_len)
    causal = positions[None, :] <= positions[:, None]
    window = (positions[None, :] // bs) >= (positions[:, None] // bs - ssa.local_blocks + 1)
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.input_layernorm(hidden[i])
            q = attn.q_proj(x).view(batch, seq_len, attn.num_heads, attn.head_dim)
            k = attn.k_proj(x).view(batch, seq_len, attn.num_kv_heads, attn.head_dim)
        q_rot = attn.rotary(q, positions[None, :, None])
        k_rot = attn.rotary(k, positions[None, :, None])
        group = attn.num_heads // attn.num_kv_heads
        if config.position_scheme == "rope":
            q, k = q_rot, k_rot
        selection = select_blocks(q, k, ssa, causal=True)
        s = _scores(q, k, group, attn.scale)
        if config.position_scheme == "local_rope":
            s = torch.where(window, _scores(q_rot, k_rot, group, attn.scale), s)
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        mask = _selection_mask(selection.block_idx, bs, seq_len, attn.num_heads)
        oracle = _brute_oracle(probs, bs, ssa.sink_blocks, ssa.local_blocks, ssa.top_k, attn.num_kv_heads)
        out.append(((probs * mask).sum(-1), oracle))
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seq_len", [97, 200])
def test_matches_full_matrix_reference(scheme, seq_len):
    model = _model(scheme)
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    reference = _reference(model, input_ids)
    result = model_attention_recall(model, input_ids)
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    assert result["tokens"] == seq_len and result["queries"] == seq_len
    assert result["position_scheme"] == scheme
    assert result["ssa"] == model.config.ssa_config.to_dict()
    for row, (ref, ref_oracle) in zip(result["layers"], reference):
        per_head = ref.mean(dim=(0, 2))
        torch.testing.assert_close(torch.tensor(row["per_head"]), per_head, atol=1e-5, rtol=0)
        assert row["recall"] == pytest.approx(float(per_head.mean()), abs=1e-5)
        assert 0.0 <= row["recall"] <= 1.0
        # Sharp random attention: the selection misses real mass (the comparison is not trivial).
        assert row["recall"] < 0.999
        oracle = ref_oracle.mean(dim=(0, 2))
        torch.testing.assert_close(torch.tensor(row["oracle_per_head"]), oracle, atol=1e-5, rtol=0)
        assert row["oracle_recall"] == pytest.approx(float(oracle.mean()), abs=1e-5)
        assert row["recall"] - 1e-6 <= row["oracle_recall"] < 0.999
    assert result["mean"] == pytest.approx(sum(r["recall"] for r in result["layers"]) / 2)
    assert result["oracle_recall"] == pytest.approx(sum(r["oracle_recall"] for r in result["layers"]) / 2)

    # A subset of query rows, and one layer only.
    subset = model_attention_recall(model, input_ids, layers=[1], max_queries=23)
    rows = query_rows(seq_len, 23)
    assert subset["queries"] == rows.numel() == 23
    assert [row["layer"] for row in subset["layers"]] == [1]
    per_head = reference[1][0][:, :, rows].mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(subset["layers"][0]["per_head"]), per_head, atol=1e-5, rtol=0)
    oracle = reference[1][1][:, :, rows].mean(dim=(0, 2))
    oracle_per_head = torch.tensor(subset["layers"][0]["oracle_per_head"])
    torch.testing.assert_close(oracle_per_head, oracle, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_budget_recalls_everything(scheme):
    model = _model(scheme, ssa={"top_k": 64})
    result = model_attention_recall(model, torch.randint(0, 256, (1, 131)))
    for row in result["layers"]:
        assert row["per_head"] == pytest.approx([1.0] * 4, abs=1e-5)
        assert row["oracle_per_head"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert result["keys_attended"] == pytest.approx(1.0)
    assert result["oracle_recall"] == pytest.approx(1.0, abs=1e-5)


def test_keys_attended_share():
    model = _model("local_rope", ssa={"top_k": 1, "local_blocks": 1, "sink_blocks": 0})
    seq_len = 200
    result = model_attention_recall(model, torch.randint(0, 256, (1, seq_len)))
    # Own block (up to the token) plus one complete earlier block where one exists.
    selected = sum(i % 16 + 1 + (16 if i >= 16 else 0) for i in range(seq_len))
    dense = seq_len * (seq_len + 1) / 2
    assert result["keys_attended"] == pytest.approx(selected / dense)


def test_model_unchanged_and_unwrapped():
    model = _model("local_rope")
    input_ids = torch.randint(0, 256, (2, 90))
    with torch.no_grad():
        before = model(input_ids=input_ids, use_cache=False).logits
    result = model_attention_recall(model, input_ids)
    assert 0.0 < result["mean"] <= 1.0
    for layer in model.model.layers:
        assert "_attend_sparse" not in layer.self_attn.__dict__
        assert "_attend" not in layer.self_attn.__dict__
    with torch.no_grad():
        after = model(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_local_rope_recall_without_rotation_is_plain_recall():
    """With an identity rotation the local_rope recall is plain ``attention_recall``."""
    from subquad import SSAConfig, attention_recall

    q, k = torch.randn(2, 150, 4, 16) * 2, torch.randn(2, 170, 2, 16) * 2
    config = SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=3)
    selection = select_blocks(q, k, config)
    ours = local_rope_recall(q, k, selection, lambda x, pos: x, 1, 3, reduction="none")
    plain = attention_recall(q, k, selection, reduction="none")
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    assert ours.shape == (2, 150, 4)


def _rotate(x, positions):
    """A plain RoPE: ``x [..., D]`` rotated by ``positions`` (broadcastable to ``x.shape[:-1]``)."""
    half = x.shape[-1] // 2
    angle = positions[..., None].float() * 100.0 ** (-torch.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)


def _dense_probs(q, k, block_size, local_blocks, rotate):
    """Full ``[B, Hq, T, S]`` causal softmax; with ``rotate``, keys in the token's local window scored
    with rotated q/k, the others unrotated (``local_rope``)."""
    seq_len_q, heads_q, dim = q.shape[1:]
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group, scale = heads_q // heads_kv, dim**-0.5
    qpos, kpos = torch.arange(seq_len_k - seq_len_q, seq_len_k), torch.arange(seq_len_k)
    s = _scores(q, k, group, scale)
    if rotate is not None:
        rotated = _scores(rotate(q, qpos[None, :, None]), rotate(k, kpos[None, :, None]), group, scale)
        window = (kpos[None, :] // block_size) > (qpos[:, None] // block_size - local_blocks)
        s = torch.where(window, rotated, s)
    return torch.softmax(s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf")), dim=-1)


def _random_case(batch, seq_len_q, seq_len_k, heads_q, heads_kv, dim, seed):
    """Sharp random q/k (never zeros): most of a row's mass on a few blocks, not all on one."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len_q, heads_q, dim, generator=generator) * 1.5
    k = torch.randn(batch, seq_len_k, heads_kv, dim, generator=generator) * 1.5
    return q, k


@pytest.mark.parametrize("rotary", [False, True])
def test_oracle_matches_brute_force(rotary):
    """Against the full softmax matrix with blocks picked row by row, and no other choice of the routed
    blocks captures more mass (every subset of the candidates tried)."""
    q, k = _random_case(2, 93, 157, 4, 2, 16, seed=1)
    config = SSAConfig(block_size=16, top_k=3, sink_blocks=1, local_blocks=2)
    selection = select_blocks(q, k, config)
    local_rotary = (_rotate, 1, 2) if rotary else None
    ours = oracle_recall(q, k, selection, reduction="none", local_rotary=local_rotary)
    assert ours.shape == (2, 93, 4)
    probs = _dense_probs(q, k, 16, 2, _rotate if rotary else None)
    expected = _brute_oracle(probs, 16, 1, 2, 3, heads_kv=2).transpose(1, 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    # Exhaustive: the best 3 routed blocks by the group's mean mass, over every subset.
    mass = torch.nn.functional.pad(probs, (0, 3)).view(2, 4, 93, 10, 16).sum(-1)
    group_mass = mass.view(2, 2, 2, 93, 10).mean(2)  # [B, Hkv, T, NB]
    ours_group = ours.view(2, 93, 2, 2).mean(-1)  # [B, T, Hkv]
    for b, h, t in itertools.product(range(2), range(2), range(93)):
        qblock = (157 - 93 + t) // 16
        forced = [j for j in range(qblock + 1) if j < 1 or j > qblock - 2]
        others = [j for j in range(qblock + 1) if j not in forced]
        row = group_mass[b, h, t].tolist()
        subsets = itertools.combinations(others, min(3, len(others)))
        best = max(sum(row[j] for j in subset) for subset in subsets)
        assert float(ours_group[b, t, h]) == pytest.approx(best + sum(row[j] for j in forced), abs=1e-5)

    # A subset of rows gives those rows' values; the mean reduction their mean.
    rows = query_rows(93, 11)
    subset = oracle_recall(q, k, selection, max_queries=11, reduction="none", local_rotary=local_rotary)
    torch.testing.assert_close(subset, ours[:, rows], atol=1e-6, rtol=0)
    mean = oracle_recall(q, k, selection, local_rotary=local_rotary)
    assert float(mean) == pytest.approx(float(ours.mean()), abs=1e-6)


@pytest.mark.parametrize(
    "seq_len_q, seq_len_k, heads_q, heads_kv, block_size, top_k, sink_blocks, local_blocks",
    [(63, 63, 4, 1, 16, 1, 1, 1), (97, 131, 8, 2, 16, 3, 2, 2), (101, 203, 4, 4, 32, 2, 0, 3)],
)
@pytest.mark.parametrize("rotary", [False, True])
def test_oracle_at_least_router_recall(
    seq_len_q, seq_len_k, heads_q, heads_kv, block_size, top_k, sink_blocks, local_blocks, rotary
):
    """Per (token, KV head), the query heads' mean oracle recall is at least the router's, and at most 1."""
    q, k = _random_case(2, seq_len_q, seq_len_k, heads_q, heads_kv, 16, seed=seq_len_q)
    config = SSAConfig(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    selection = select_blocks(q, k, config)
    if rotary:
        local_rotary = (_rotate, sink_blocks, local_blocks)
        router = local_rope_recall(q, k, selection, *local_rotary, reduction="none")
        oracle = oracle_recall(q, k, selection, reduction="none", local_rotary=local_rotary)
    else:
        from subquad import attention_recall

        router = attention_recall(q, k, selection, reduction="none")
        oracle = oracle_recall(q, k, selection, reduction="none")
    group = heads_q // heads_kv
    router_group = router.view(2, seq_len_q, heads_kv, group).mean(-1)
    oracle_group = oracle.view(2, seq_len_q, heads_kv, group).mean(-1)
    assert bool((oracle_group >= router_group - 1e-6).all())
    assert bool((oracle <= 1 + 1e-6).all()) and bool((oracle > 0).all())
    # The router misses mass the oracle finds (the comparison is not trivial).
    assert float(oracle_group.mean()) > float(router_group.mean()) + 1e-3


@pytest.mark.parametrize("rotary", [False, True])
def test_oracle_full_budget_is_one(rotary):
    q, k = _random_case(1, 75, 119, 4, 2, 16, seed=3)
    config = SSAConfig(block_size=16, top_k=8, sink_blocks=1, local_blocks=2)  # 8 blocks in all
    selection = select_blocks(q, k, config)
    # Only sinks and local blocks routed by hand (the routed slots left empty): the oracle fills them.
    fixed = selection.num_fixed_slots
    empty = selection.block_idx.clone()
    empty[..., fixed:] = -1
    empty = SSASelection(empty, 16, fixed)
    local_rotary = (_rotate, 1, 2) if rotary else None
    for chosen in (selection, empty):
        oracle = oracle_recall(q, k, chosen, reduction="none", local_rotary=local_rotary)
        torch.testing.assert_close(oracle, torch.ones_like(oracle), atol=1e-5, rtol=0)
    assert float(local_rope_recall(q, k, empty, _rotate, 1, 2)) < 0.99


def test_oracle_needs_fixed_slots():
    q, k = _random_case(1, 40, 40, 2, 1, 16, seed=4)
    selection = select_blocks(q, k, SSAConfig(block_size=16, top_k=1, sink_blocks=1, local_blocks=1))
    with pytest.raises(ValueError, match="num_fixed_slots"):
        oracle_recall(q, k, SSASelection(selection.block_idx, 16))
    with pytest.raises(ValueError, match="reduction"):
        oracle_recall(q, k, selection, reduction="sum")


def test_validation():
    model = _model("rope")
    ids = torch.randint(0, 256, (1, 40))
    with pytest.raises(ValueError, match="layers"):
        model_attention_recall(model, ids, layers=[2])
    with pytest.raises(ValueError, match="max_queries"):
        model_attention_recall(model, ids, max_queries=0)
    with pytest.raises(ValueError, match="input_ids"):
        model_attention_recall(model, ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        model_attention_recall(model, ids + 1000)
    with pytest.raises(ValueError, match="recall needs an SSA model"):
        model_attention_recall(_model("rope", attention="dense"), ids)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from subquad.train import build_corpus, load_split

    root = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "def", "return", "(", ")", "\n"]
    for i in range(24):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)), encoding="utf-8")
    out = tmp_path_factory.mktemp("corpus")
    meta = build_corpus([root], out, tokenizer="bytes", heldout_fraction=0.5, progress=False)
    assert len(load_split(out, "heldout")) > 2000
    return out, meta


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, corpus):
    _, meta = corpus
    dirs = {}
    for attention in ("ssa", "dense"):
        scheme = "local_rope" if attention == "ssa" else "rope"
        path = tmp_path_factory.mktemp(f"model-{attention}")
        _model(scheme, attention=attention, vocab_size=meta["vocab_size"]).save_pretrained(path)
        dirs[attention] = path
    return dirs


def test_cli_writes_json(corpus, model_dirs, tmp_path, capsys):
    corpus_dir, _ = corpus
    out = tmp_path / "runs" / "recall.json"
    argv = ["--model", str(model_dirs["ssa"]), "--corpus", str(corpus_dir), "--length", "300"]
    argv += ["--windows", "3", "--out", str(out), "--device", "cpu", "--max-queries", "40"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| layer | recall | oracle recall |" in printed and "**mean**" in printed
    result = json.loads(out.read_text())
    assert result["length"] == 300 and result["windows"] == 3 and len(result["window_starts"]) == 3
    assert result["window_starts"][0] == 0 and result["split"] == "heldout"
    assert result["queries_per_window"] == 40 and result["max_queries"] == 40
    assert result["position_scheme"] == "local_rope"
    assert result["ssa"]["block_size"] == 16
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    for row in result["layers"]:
        assert len(row["per_head"]) == 4 and len(row["oracle_per_head"]) == 4
        assert 0.0 <= row["recall"] <= row["oracle_recall"] + 1e-6 <= 1.0 + 1e-6
        assert 0.0 < row["keys_attended"] < 1.0
        # A query tile visits at least the blocks each of its tokens chose; the tree index picks
        # some, not necessarily all, of the flat router's blocks.
        assert row["tile_overhead"] >= 1.0 and 0.0 <= row["index_agreement"] <= 1.0
    assert "| tile overhead |" in printed
    assert 0.0 <= result["mean"] <= 1.0
    assert result["mean"] == pytest.approx(sum(r["recall"] for r in result["layers"]) / 2)
    assert result["oracle_recall"] == pytest.approx(sum(r["oracle_recall"] for r in result["layers"]) / 2)
    assert len(result["per_window"]) == 3
    assert all(w["mean"] <= w["oracle_recall"] + 1e-6 for w in result["per_window"])


def test_cli_ssa_override(corpus, model_dirs, tmp_path):
    """``--ssa`` routes the same weights otherwise: a budget covering every block recalls everything."""
    corpus_dir, _ = corpus
    out = tmp_path / "recall.json"
    argv = ["--model", str(model_dirs["ssa"]), "--corpus", str(corpus_dir), "--length", "300"]
    argv += ["--windows", "1", "--out", str(out), "--device", "cpu", "--max-queries", "40"]
    argv += ["--ssa", "top_k=64", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["ssa"]["top_k"] == 64 and result["ssa"]["block_size"] == 16
    assert result["mean"] == pytest.approx(1.0, abs=1e-5)
    assert result["oracle_recall"] == pytest.approx(1.0, abs=1e-5)


def test_cli_errors(corpus, model_dirs, tmp_path, capsys):
    corpus_dir, _ = corpus
    out = str(tmp_path / "r.json")
    common = ["--corpus", str(corpus_dir), "--out", out, "--device", "cpu"]
    assert main(["--model", str(model_dirs["dense"]), "--length", "100", *common]) == 2
    assert "recall needs an SSA model" in capsys.readouterr().err
    assert main(["--model", str(model_dirs["ssa"]), "--length", "1m", *common]) == 2
    err = capsys.readouterr().err
    assert "length" in err and "held-out split" in err
    assert main(["--model", str(model_dirs["ssa"]), "--length", "100", "--windows", "0", *common]) == 2
    assert "windows" in capsys.readouterr().err
    assert main(["--model", str(model_dirs["ssa"]), "--length", "abc", *common]) == 2
    assert "length" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--length", "100", *common]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(model_dirs["ssa"]), "--length", "100", "--ssa", "top_k=-3", *common]) == 2
    assert "top_k" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
