"""The coarse context term (``SubquadConfig.coarse_span``): the function against a brute-force loop,
causality, and a model with it on every inference path."""

import pytest
import torch
from torch import nn

from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.coarse import coarse_context_attention


def _maps(dim, seed):
    gen = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(2):
        m = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=gen))
        maps.append(m)
    return maps


def _coarse_loop(q, k, v, span, block_size, local_blocks, scale, key_map, value_map):
    """One query and one head at a time: the spans before the query's window, plus a zero entry."""
    batch, steps, heads_q, _ = q.shape
    seq_len, heads_kv = k.shape[1], k.shape[2]
    out = torch.zeros(batch, steps, heads_q, v.shape[-1], dtype=torch.float64)
    for i in range(steps):
        p = seq_len - steps + i
        window_start = max(0, p // block_size - (local_blocks - 1)) * block_size
        spans = window_start // span
        for b in range(batch):
            for h in range(heads_q):
                g = h // (heads_q // heads_kv)
                keys = [torch.zeros(k.shape[-1], dtype=torch.float64)]
                values = [torch.zeros(v.shape[-1], dtype=torch.float64)]
                for j in range(spans):
                    keys.append(key_map(k[b, j * span : (j + 1) * span, g].mean(0)).double())
                    values.append(value_map(v[b, j * span : (j + 1) * span, g].mean(0)).double())
                weights = torch.softmax(torch.stack(keys) @ q[b, i, h].double() * scale, dim=0)
                out[b, i, h] = weights @ torch.stack(values)
    return out


@pytest.mark.parametrize("heads, span", [((6, 2), 12), ((3, 3), 16), ((4, 1), 7)])
def test_coarse_term_equals_a_loop_over_queries(heads, span):
    torch.manual_seed(0)
    hq, hkv = heads
    q, k, v = torch.randn(2, 37, hq, 8), torch.randn(2, 101, hkv, 8), torch.randn(2, 101, hkv, 8)
    key_map, value_map = _maps(8, 1)
    with torch.no_grad():
        out = coarse_context_attention(q, k, v, span, 16, 2, 0.4, key_map, value_map)
        ref = _coarse_loop(q, k, v, span, 16, 2, 0.4, key_map, value_map)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # The first query sits at 64: window 48-79 (local_blocks 2 of 16), so it sees spans ending by 48.
    assert out[:, 0].abs().sum() > 0


def test_coarse_term_is_causal_and_sees_only_spans_before_the_window():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 80, 2, 8), torch.randn(1, 80, 1, 8), torch.randn(1, 80, 1, 8)
    key_map, value_map = _maps(8, 2)
    run = lambda k, v: coarse_context_attention(q, k, v, 10, 16, 2, 0.5, key_map, value_map)  # noqa: E731
    with torch.no_grad():
        base = run(k, v)
        # Query 60's window starts at 32 (blocks 2 and 3): spans 0-9, 10-19, 20-29 only.
        k2, v2 = k.clone(), v.clone()
        k2[:, 30:] += 3.0
        v2[:, 30:] -= 2.0
        moved = run(k2, v2)
        torch.testing.assert_close(moved[:, :61], base[:, :61])
        assert not torch.allclose(moved[:, 64:], base[:, 64:])  # 64's window starts at 48
        k3 = k.clone()
        k3[:, 25] += 3.0
        assert not torch.allclose(run(k3, v)[:, 60], base[:, 60])
        # Before the first complete span ends ahead of the window, only the null entry: output 0.
        assert torch.equal(base[:, :32], torch.zeros_like(base[:, :32]))


def test_coarse_term_gradients_match_autograd_of_the_loop():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 19, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_map, value_map = (m.double() for m in _maps(4, 3))
    out = coarse_context_attention(q, k[:, :, :1], v[:, :, :1], 3, 4, 2, 0.7, key_map, value_map)
    ref = _coarse_loop(q, k[:, :, :1], v[:, :, :1], 3, 4, 2, 0.7, key_map, value_map)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, key_map.weight), grad)
    want = torch.autograd.grad(ref, (q, k, v, key_map.weight), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[3].abs().sum() > 0


def make_model(**over):
    cfg = SubquadConfig.from_flavor(
        "debug", attention="ssa", position_scheme="local_rope", coarse_span=16, **over
    )
    return SubquadForCausalLM(cfg).eval()


def _plain_twin(model):
    """The same weights without the term."""
    over = {"coarse_span": None, "coarse_layers": None, "coarse_heads": None, "coarse_dropout": 0.0}
    plain = SubquadForCausalLM(model.config.__class__(**{**model.config.to_dict(), **over}))
    plain.load_state_dict(model.state_dict(), strict=False)
    return plain.train(model.training)


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(coarse_span=0), ValueError, "coarse_span=0"),
        (dict(coarse_span=2.5), TypeError, "coarse_span=2.5"),
        (dict(coarse_span=16, attention="dense"), ValueError, "coarse_span=16 with attention='dense'"),
        (dict(coarse_span=16, position_scheme="rope"), ValueError, "position_scheme='rope'"),
        (dict(coarse_layers=[0]), ValueError, r"coarse_layers=\[0\]: expected coarse_span"),
        (dict(coarse_span=16, coarse_layers=1), TypeError, "coarse_layers=1: expected None or a list"),
        (dict(coarse_span=16, coarse_heads=[4]), ValueError, r"coarse_heads=\[4\]: expected .* in \[0, 4\)"),
        (dict(coarse_heads=[1]), ValueError, r"coarse_heads=\[1\]: expected coarse_span"),
        (dict(coarse_span=16, coarse_dropout=1.0), ValueError, r"coarse_dropout=1.0: expected a probability"),
        (dict(coarse_span=16, coarse_dropout=-0.1), ValueError, "coarse_dropout=-0.1"),
        (dict(coarse_span=16, coarse_dropout=True), ValueError, "coarse_dropout=True"),
        (dict(coarse_dropout=0.5), ValueError, "coarse_dropout=0.5: expected coarse_span"),
        (dict(coarse_span=16, coarse_layers=[]), ValueError, "coarse_layers=\\[\\]: expected distinct"),
        (dict(coarse_span=16, coarse_layers=[1, 1]), ValueError, "coarse_layers=\\[1, 1\\]"),
        (dict(coarse_span=16, coarse_layers=[2]), ValueError, r"distinct indices in \[0, 2\)"),
        (dict(coarse_span=16, coarse_layers=[[0]]), ValueError, "coarse_layers=\\[\\[0\\]\\]"),
    ],
)
def test_config_validation(over, error, match):
    with pytest.raises(error, match=match):
        SubquadConfig.from_flavor("debug", **{"position_scheme": "local_rope", **over})


def test_the_maps_start_as_identity_and_the_trunk_as_the_dense_twins(tmp_path):
    torch.manual_seed(3)
    twin = dict(
        SubquadForCausalLM(
            SubquadConfig.from_flavor("debug", attention="dense", position_scheme="local_rope")
        ).named_parameters()
    )
    torch.manual_seed(3)
    model = make_model()
    params = dict(model.named_parameters())
    maps = {n: p for n, p in params.items() if "coarse" in n}
    assert len(maps) == 2 * model.config.num_hidden_layers
    assert params.keys() - maps.keys() == twin.keys()
    assert all(torch.equal(params[n], twin[n]) for n in twin)
    assert all(torch.equal(p, torch.eye(16)) for p in maps.values())
    # Trained maps load as saved.
    with torch.no_grad():
        for p in maps.values():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = SubquadForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.coarse_span == 16
    assert all(torch.equal(dict(loaded.named_parameters())[n], p) for n, p in maps.items())
    ids = torch.randint(0, 256, (1, 90))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_the_term_changes_the_output_and_trains():
    model = make_model().train()
    plain = _plain_twin(model)
    ids = torch.randint(0, 256, (2, 120))
    out = model(ids, labels=ids)
    with torch.no_grad():
        gap = (out.logits - plain(ids).logits).abs().max()
    assert gap > 1e-3
    out.loss.backward()
    grad = model.model.layers[0].self_attn.coarse_value_map.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_coarse_layers_put_the_term_in_those_layers_only(tmp_path):
    model = make_model(coarse_layers=(1,))
    has_term = [layer.self_attn.coarse_key_map is not None for layer in model.model.layers]
    assert has_term == [False, True]
    model.save_pretrained(tmp_path)
    loaded = SubquadForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.coarse_layers == [1]
    assert [layer.self_attn.coarse_value_map is not None for layer in loaded.model.layers] == has_term
    # The layer without the term computes what a model without it computes.
    plain = _plain_twin(model.eval())
    ids = torch.randint(0, 256, (1, 120))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        plain_states = plain(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(states[1], plain_states[1])
        assert (states[2] - plain_states[2]).abs().max() > 1e-4


def test_coarse_heads_give_the_term_to_those_heads_only(tmp_path):
    model = make_model(coarse_heads=[1, 3])
    q, k, v = torch.randn(2, 100, 4, 16), torch.randn(2, 100, 2, 16), torch.randn(2, 100, 2, 16)
    with torch.no_grad():
        term = model.model.layers[0].self_attn._attend_coarse(q, k, v)
    per_head = term.abs().amax(dim=(0, 1, 3))
    assert per_head[0] == 0 and per_head[2] == 0 and per_head[1] > 0 and per_head[3] > 0
    # A loaded model computes what the saved one did.
    model.save_pretrained(tmp_path)
    loaded = SubquadForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 120))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_coarse_dropout_drops_the_term_for_whole_training_rows_only():
    torch.manual_seed(0)
    model = make_model(coarse_dropout=0.5).train()
    plain = _plain_twin(model)
    ids = torch.randint(0, 256, (8, 100))
    torch.manual_seed(1)
    keep = torch.rand(8) >= 0.5  # the draw the forward below makes
    assert 0 < keep.sum() < 8
    torch.manual_seed(1)
    with torch.no_grad():
        logits, plain_logits = model(ids).logits, plain(ids).logits
        torch.testing.assert_close(logits[~keep], plain_logits[~keep])
        assert (logits[keep] - plain_logits[keep]).abs().amax(dim=(1, 2)).min() > 1e-4
        # Evaluation always has the term.
        evaluated = model.eval()(ids).logits
        assert (evaluated[~keep] - plain_logits[~keep]).abs().amax(dim=(1, 2)).min() > 1e-4


@pytest.mark.parametrize("layers", [None, [0]])
def test_incremental_decoding_chunked_prefill_and_padding_match_a_full_forward(
    layers, check_prefill_and_decode, check_padded_batch
):
    model = make_model(router="learned", ssa={"summary": "max", "sub_block_size": 4}, coarse_layers=layers)
    check_prefill_and_decode(model, torch.randint(0, 256, (2, 150)))
    check_padded_batch(model, max_new_tokens=20)
