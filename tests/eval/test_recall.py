"""Attention recall of a model's own selections (``subquad.eval.recall``) against full-matrix references."""

from __future__ import annotations

import json
import random

import pytest
import torch

from subquad.eval.recall import local_rope_recall, main, model_attention_recall, query_rows
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.ops.ssa.select import select_blocks

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


def _reference(model: SubquadForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[B, Hq, T]`` recall from the full ``T x S`` score matrix, q/k rebuilt from the weights.

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
        out.append((probs * mask).sum(-1))
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
    for row, ref in zip(result["layers"], reference):
        per_head = ref.mean(dim=(0, 2))
        torch.testing.assert_close(torch.tensor(row["per_head"]), per_head, atol=1e-5, rtol=0)
        assert row["recall"] == pytest.approx(float(per_head.mean()), abs=1e-5)
        assert 0.0 <= row["recall"] <= 1.0
        # Sharp random attention: the selection misses real mass (the comparison is not trivial).
        assert row["recall"] < 0.999
    assert result["mean"] == pytest.approx(sum(r["recall"] for r in result["layers"]) / 2)

    # A subset of query rows, and one layer only.
    subset = model_attention_recall(model, input_ids, layers=[1], max_queries=23)
    rows = query_rows(seq_len, 23)
    assert subset["queries"] == rows.numel() == 23
    assert [row["layer"] for row in subset["layers"]] == [1]
    per_head = reference[1][:, :, rows].mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(subset["layers"][0]["per_head"]), per_head, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_budget_recalls_everything(scheme):
    model = _model(scheme, ssa={"top_k": 64})
    result = model_attention_recall(model, torch.randint(0, 256, (1, 131)))
    for row in result["layers"]:
        assert row["per_head"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert result["keys_attended"] == pytest.approx(1.0)


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
    assert "| layer | recall |" in printed and "**mean**" in printed
    result = json.loads(out.read_text())
    assert result["length"] == 300 and result["windows"] == 3 and len(result["window_starts"]) == 3
    assert result["window_starts"][0] == 0 and result["split"] == "heldout"
    assert result["queries_per_window"] == 40 and result["max_queries"] == 40
    assert result["position_scheme"] == "local_rope"
    assert result["ssa"]["block_size"] == 16
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    for row in result["layers"]:
        assert len(row["per_head"]) == 4
        assert 0.0 <= row["recall"] <= 1.0
        assert 0.0 < row["keys_attended"] < 1.0
        # A query tile visits at least the blocks each of its tokens chose; the tree index picks
        # some, not necessarily all, of the flat router's blocks.
        assert row["tile_overhead"] >= 1.0 and 0.0 <= row["index_agreement"] <= 1.0
    assert "| tile overhead |" in printed
    assert 0.0 <= result["mean"] <= 1.0
    assert result["mean"] == pytest.approx(sum(r["recall"] for r in result["layers"]) / 2)
    assert len(result["per_window"]) == 3


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
    assert not (tmp_path / "r.json").exists()
