"""Subquad models: config validation, save/load, incremental decoding, generate, chunked prefill."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import subquad
from subquad.models import SubquadConfig, SubquadForCausalLM, prefill
from subquad.models.subquad import modeling

SCHEMES = [("ssa", "rope"), ("ssa", "local_rope"), ("dense", "rope"), ("dense", "local_rope")]


def make_model(attention="ssa", position_scheme="rope", **over):
    cfg = SubquadConfig.from_flavor("debug", attention=attention, position_scheme=position_scheme, **over)
    return SubquadForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(attention="flash"), "attention='flash'"),
        (dict(position_scheme="alibi"), "position_scheme='alibi'"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(hidden_size=66), "hidden_size=66"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(ssa={"top_kk": 2}), "unknown field"),
        (dict(ssa={"block_size": 24}), "block_size=24"),
        (dict(rope_theta=0.5), "rope_theta=0.5"),
    ],
)
def test_config_validation(over, match):
    with pytest.raises(ValueError, match=match):
        SubquadConfig.from_flavor("debug", **over)


def test_config_type_and_flavor_errors():
    with pytest.raises(TypeError, match="num_hidden_layers=2.5"):
        SubquadConfig(num_hidden_layers=2.5)
    with pytest.raises(ValueError, match="flavor='huge'"):
        SubquadConfig.from_flavor("huge")


@pytest.mark.parametrize(
    "flavor, low, high", [("debug", 1e4, 1e6), ("nano", 7e6, 13e6), ("small", 100e6, 140e6)]
)
def test_flavor_sizes(flavor, low, high):
    cfg = SubquadConfig.from_flavor(flavor)
    with torch.device("meta"):
        model = SubquadForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, n
    assert cfg.ssa_config.block_size == cfg.ssa["block_size"]


def test_rotary_tables_rotate_like_the_pairwise_formula():
    # The model rotates with tables computed once per forward; the result must be the rotation
    # [x1 cos - x2 sin, x2 cos + x1 sin] to the bit, in every dtype.
    from subquad.models.subquad.modeling import SubquadRotary

    rotary = SubquadRotary(64, 10000.0)
    positions = torch.randint(0, 12_000_000, (2, 50, 1))
    inv_freq = 10000.0 ** (-torch.arange(0, 32, dtype=torch.float32) / 32)
    freqs = (positions.double()[..., None] * inv_freq.double()) % (2 * math.pi)
    cos, sin = freqs.float().cos(), freqs.float().sin()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 50, 3, 64).to(dtype)
        x1, x2 = x.float()[..., :32], x.float()[..., 32:]
        want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
        assert torch.equal(rotary.rotate(x, rotary.tables(positions)), want)
        assert torch.equal(rotary(x, positions), want)


def test_rotary_scores_depend_on_the_offset_alone_at_12m_positions():
    # Rotary attention reads only relative positions: q at p and keys at p - 20 .. p must score alike at
    # p = 20, 12M - 1 and 16M - 1. Float32 angles (position * inv_freq) rounded by up to 0.5 rad there, and
    # the shipped local_rope model answered differently with its positions moved to 12M.
    from subquad.models.subquad.modeling import SubquadRotary

    rotary = SubquadRotary(64, 10000.0)
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64), torch.randn(1, 21, 1, 64, dtype=torch.float64)
    scores = []
    for start in (0, 12 * 2**20 - 21, 2**24 - 21):
        q_rot = rotary(q, torch.tensor([[[start + 20]]]))
        k_rot = rotary(k, torch.arange(start, start + 21)[None, :, None])
        scores.append((q_rot * k_rot).sum(-1).flatten())
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=0, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = make_model(position_scheme="local_rope")
    ids = torch.randint(0, 256, (1, 40))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SubquadConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SubquadForCausalLM)
    assert loaded.config.ssa == model.config.ssa and loaded.config.position_scheme == "local_rope"
    # Tied embeddings stay tied after loading.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("attention, scheme", SCHEMES)
def test_incremental_decoding_equals_full_forward(attention, scheme):
    # block 16, top_k 2, 150 tokens: ~9 blocks, so routing actually chooses among earlier blocks.
    model = make_model(attention, scheme)
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :97], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for i in range(97, 150):
            logits.append(model(ids[:, i : i + 1], past_key_values=cache).logits)
    assert isinstance(cache, subquad.SSACache) and cache.get_seq_length() == 150
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=2e-5, rtol=1e-4)


def test_sparse_budget_differs_from_dense_twin():
    # Guards the equality tests above: at this budget SSA really drops keys.
    sparse = make_model("ssa", "rope")
    dense = make_model("dense", "rope")
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 256, (1, 150))
    with torch.no_grad():
        gap = (sparse(ids).logits - dense(ids).logits).abs().max()
        assert gap > 1e-3
        full_budget = make_model("ssa", "rope", ssa={"top_k": 64})
        full_budget.load_state_dict(sparse.state_dict())
        torch.testing.assert_close(full_budget(ids).logits, dense(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["rope", "local_rope"])
def test_generate_with_and_without_cache_agree(scheme):
    model = make_model("ssa", scheme)
    ids = torch.randint(0, 256, (2, 60))
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 100)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("scheme", ["rope", "local_rope"])
def test_generate_scores_every_step_with_the_whole_context(scheme):
    # Each step's logits are the full forward's at that position. Greedy tokens alone cannot show a
    # dropped cache on a random model, whose argmax follows the current token: transformers 5.24
    # passes the cache as `cache=`, which these models once ignored, so every step after the first
    # read only its own token while the two generate() runs above still agreed.
    model = make_model("ssa", scheme)
    ids = torch.randint(0, 256, (2, 60))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    assert len(out.logits) == 6
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + step], atol=2e-5, rtol=1e-4)


def test_the_cache_goes_in_under_either_name():
    model = make_model("ssa", "local_rope")
    ids = torch.randint(0, 256, (1, 50))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("past_key_values", "cache"):
            cache = subquad.SSACache(model.config)
            model(ids[:, :-1], use_cache=True, **{name: cache})
            step = model(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-4)
            assert cache.get_seq_length() == 50
        with pytest.raises(ValueError, match="past_key_values, cache: got both"):
            model(ids, past_key_values=subquad.SSACache(model.config), cache=subquad.SSACache(model.config))


def test_prefill_progress_sets_the_default_bar(monkeypatch, capsys):
    import importlib

    from subquad.models.prefill import prefill_progress

    prefill_module = importlib.import_module("subquad.models.prefill")  # the package exports the function

    model = make_model("ssa", "local_rope")
    ids = torch.randint(0, 256, (1, 40))
    monkeypatch.setattr(prefill_module, "_PROGRESS_MIN_TOKENS", 32)  # this prompt shows a bar by default
    with torch.no_grad():
        for context, shown in ((prefill_progress(False), False), (prefill_progress(None), True)):
            with context:
                prefill(model, ids, chunk_size=16)
            assert ("prefill" in capsys.readouterr().err) == shown
        with prefill_progress(False):
            prefill(model, ids, chunk_size=16, progress=True)  # an explicit argument still wins
        assert "prefill" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["rope", "local_rope"])
def test_chunked_prefill_equals_unchunked(scheme):
    model = make_model("ssa", scheme)
    ids = torch.randint(0, 256, (2, 131))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = prefill(model, ids, chunk_size=37, logits_to_keep=0, progress=False)
        torch.testing.assert_close(out.logits, full, atol=2e-5, rtol=1e-4)
        last = prefill(model, ids, chunk_size=20, progress=True)
        assert last.logits.shape == (2, 1, 256)
        torch.testing.assert_close(last.logits, full[:, -1:], atol=2e-5, rtol=1e-4)
        # The filled cache continues decoding exactly like a full forward.
        nxt = torch.randint(0, 256, (2, 1))
        step = model(nxt, past_key_values=last.past_key_values).logits
        ref = model(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1:]
        torch.testing.assert_close(step, ref, atol=2e-5, rtol=1e-4)


def test_prefill_reads_an_unpadded_mask_once(monkeypatch):
    """A mask with nothing padded is checked once for the whole prompt, not once per chunk (on a GPU
    each chunk's check waits for the chunk before); padded masks still reach every chunk."""
    model = make_model("ssa", "rope")
    ids = torch.randint(0, 256, (2, 70))
    seen = []
    valid_mask = modeling._valid_mask

    def spy(attention_mask, *args):
        seen.append(attention_mask is not None)
        return valid_mask(attention_mask, *args)

    monkeypatch.setattr(modeling, "_valid_mask", spy)
    with torch.no_grad():
        ref = prefill(model, ids, chunk_size=16, progress=False).logits
        out = prefill(model, ids, chunk_size=16, attention_mask=torch.ones(2, 70), progress=False).logits
        assert seen == [False] * 10
        torch.testing.assert_close(out, ref)
        padded = torch.ones(2, 70)
        padded[1, :3] = 0
        prefill(model, ids, chunk_size=16, attention_mask=padded, progress=False)
        assert seen[10:] == [True] * 5
        with pytest.raises(ValueError, match=r"attention_mask: shape \(1, 70\), expected \[2, 70"):
            prefill(model, ids, attention_mask=torch.ones(1, 70))


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)])
def test_dense_lower_right_matches_the_masked_chunks(heads):
    # The CUDA path of a dense prefill chunk (T < S queries) against the CPU path's explicit mask.
    hq, hkv = heads
    q, k, v = torch.randn(2, 37, hq, 16), torch.randn(2, 101, hkv, 16), torch.randn(2, 101, hkv, 16)
    ref = modeling._dense_sdpa(q, k, v, 0.3)
    out = modeling._dense_lower_right(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3)
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    # The last query sees every key, the first only those up to its own position.
    k2 = k.clone()
    k2[:, 101 - 37 + 1 :] += 5.0
    moved = modeling._dense_lower_right(q.transpose(1, 2), k2.transpose(1, 2), v.transpose(1, 2), 0.3)
    torch.testing.assert_close(moved[:, :, 0], out[:, :, 0])
    assert not torch.allclose(moved[:, :, -1], out[:, :, -1])


def test_forward_prefills_long_prompts_in_chunks():
    model = make_model("ssa", "rope", prefill_chunk_tokens=32)
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        ref = model(ids, use_cache=False).logits[:, -1:]
    assert out.past_key_values.get_seq_length() == 100
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["rope", "local_rope"])
def test_left_padded_batch_equals_rows_alone(scheme, check_padded_batch):
    check_padded_batch(make_model("ssa", scheme), max_new_tokens=25)


def test_loss_and_backward():
    model = make_model("ssa", "local_rope").train()
    ids = torch.randint(0, 256, (2, 70))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert out.past_key_values is None
    out.loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_bad_inputs():
    model = make_model()
    ids = torch.randint(0, 256, (1, 10))
    with pytest.raises(ValueError, match="logits_to_keep=-1"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="chunk_size=0"):
        prefill(model, ids, chunk_size=0)
    other = subquad.SSACache({"block_size": 32})
    with pytest.raises(ValueError, match="block_size=32"):
        model(ids, past_key_values=other)
    finer = subquad.SSACache({"block_size": 16, "summary": "max", "sub_block_size": 4})
    with pytest.raises(ValueError, match="summarises every 4 keys, the model routes by summaries of 16"):
        model(ids, past_key_values=finer)
