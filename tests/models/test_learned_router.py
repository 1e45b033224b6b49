"""``router="learned"`` / ``"gated"``: routing projections of their own, their cache, and their
training signal."""

import pytest
import torch

import subquad
from subquad.eval.recall import model_attention_recall as recall
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.routing_loss import routing_distillation_loss
from subquad.ops.ssa.select import block_summaries


def make_model(router="learned", **over):
    cfg = SubquadConfig.from_flavor("debug", router=router, **over)
    return SubquadForCausalLM(cfg).eval()


def _copy_shared_router(learned, shared):
    learned.load_state_dict(shared.state_dict(), strict=False)
    for layer in learned.model.layers:
        layer.self_attn.init_router_from_attention()


def test_config_validation():
    with pytest.raises(ValueError, match="router='clever'"):
        SubquadConfig.from_flavor("debug", router="clever")
    with pytest.raises(ValueError, match="position_scheme='rope'"):
        SubquadConfig.from_flavor("debug", router="learned", position_scheme="rope")
    with pytest.raises(ValueError, match="attention='dense'"):
        SubquadConfig.from_flavor("debug", router="learned", attention="dense", position_scheme="rope")
    names = {n for n, _ in make_model().named_parameters()}
    assert "model.layers.0.self_attn.router_q_proj.weight" in names
    assert not any("router" in n for n, _ in make_model("shared").named_parameters())
    gated = {n for n, _ in make_model("gated").named_parameters()}
    assert "model.layers.1.self_attn.router_k_gate.bias" in gated
    with pytest.raises(ValueError, match="router='gated' with attention='dense'"):
        SubquadConfig.from_flavor("debug", router="gated", attention="dense", position_scheme="rope")


@pytest.mark.parametrize("router", ["learned", "gated"])
def test_a_router_leaves_the_other_initial_weights_as_the_dense_twins(router, tmp_path):
    """Same seed, same trunk: the router's weights draw apart from the global random stream."""
    torch.manual_seed(3)
    twin = dict(SubquadForCausalLM(SubquadConfig.from_flavor("debug", attention="dense")).named_parameters())
    torch.manual_seed(3)
    model = make_model(router)
    params = dict(model.named_parameters())
    routers = {n: p for n, p in params.items() if "router" in n}
    assert params.keys() - routers.keys() == twin.keys()
    assert all(torch.equal(params[n], twin[n]) for n in twin)
    weights = [p for n, p in routers.items() if n.endswith("proj.weight")]
    assert all(0.01 < float(w.detach().std()) < 0.03 for w in weights)  # the config's initializer_range, 0.02
    assert not any(torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :])
    torch.manual_seed(4)
    assert not torch.equal(make_model(router).model.layers[0].self_attn.router_q_proj.weight, weights[0])
    # A saved router loads as saved, not drawn again.
    model.save_pretrained(tmp_path)
    loaded = dict(SubquadForCausalLM.from_pretrained(tmp_path).named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in routers.items())


def _randomise_gates(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.router_k_gate.weight.normal_(0, 2)
            layer.self_attn.router_k_gate.bias.normal_()


def test_an_open_gate_routes_like_the_ungated_router_and_a_closed_one_does_not():
    learned = make_model()
    gated = make_model("gated")
    gated.load_state_dict(learned.state_dict(), strict=False)
    _randomise_gates(gated)
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        assert (gated(ids).logits - learned(ids).logits).abs().max() > 1e-3  # the gate changes picks
        for layer in gated.model.layers:
            layer.self_attn.open_router_gate()
        torch.testing.assert_close(gated(ids).logits, learned(ids).logits, atol=2e-5, rtol=1e-4)


def test_router_with_the_shared_weights_selects_like_the_shared_router():
    shared = make_model("shared")
    learned = make_model()
    _copy_shared_router(learned, shared)
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        torch.testing.assert_close(learned(ids).logits, shared(ids).logits, atol=2e-5, rtol=1e-4)
        # Guard: a different router really changes the output at this budget.
        for layer in learned.model.layers:
            layer.self_attn.router_k_proj.weight.normal_()
        assert (learned(ids).logits - shared(ids).logits).abs().max() > 1e-3


MAX_SUMMARY = {"summary": "max", "sub_block_size": 4}


@pytest.mark.parametrize("router, ssa", [("learned", {}), ("gated", {}), ("learned", MAX_SUMMARY)],
                         ids=["learned", "gated", "learned-max"])  # fmt: skip
def test_incremental_decoding_chunked_prefill_and_padding_match_a_full_forward(
    router, ssa, check_prefill_and_decode, check_padded_batch
):
    model = make_model(router, ssa=ssa)
    summary_size = model.config.ssa_config.summary_size
    if router == "gated":
        _randomise_gates(model)
    ids = torch.randint(0, 256, (2, 150))
    cache = check_prefill_and_decode(model, ids)
    layer = cache.layer(0)
    rk = model.model.layers[0].self_attn.router_k_proj
    assert layer.route_keys_bshd().shape == (2, 150, 2, 16)
    torch.testing.assert_close(layer.summaries(), block_summaries(layer.route_keys_bshd(), summary_size))
    shared_cache = make_model("shared")(ids).past_key_values
    assert rk is not None and cache.bytes_per_token() > shared_cache.bytes_per_token()
    check_padded_batch(model, max_new_tokens=20)


def test_cache_rejects_mixing_appends_with_and_without_routing_keys():
    layer = subquad.SSACache(subquad.SSAConfig(block_size=16)).layer(0)
    k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    layer.append(k, v, route_keys=torch.randn(1, 5, 2, 8))
    with pytest.raises(ValueError, match="route_keys"):
        layer.append(k, v)
    plain = subquad.SSACache(subquad.SSAConfig(block_size=16)).layer(0)
    plain.append(k, v)
    with pytest.raises(ValueError, match="stores no routing keys"):
        plain.route_keys_bshd()


@pytest.mark.parametrize("router", ["learned", "gated"])
def test_only_the_router_loss_trains_the_router_and_it_leaves_attention_alone(router):
    model = make_model(router).train()
    ids = torch.randint(0, 256, (2, 120))
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    assert attn.router_q_proj.weight.grad is None and attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)

    model.enable_routing_loss(1.0, num_queries=8)
    # The decoder alone: no LM loss, only the layers' router terms.
    model.model(input_ids=ids, use_cache=False)
    model._collect_layer_loss("routing_loss", torch.zeros(())).backward()
    assert attn.router_q_proj.weight.grad.abs().sum() > 0 and attn.router_k_proj.weight.grad.abs().sum() > 0
    if router == "gated":
        assert attn.router_k_gate.weight.grad.abs().sum() > 0
        assert len(model.router_parameters()) == 4 * len(model.model.layers)
    assert attn.q_proj.weight.grad is None and attn.k_proj.weight.grad is None
    assert model.model.embed_tokens.weight.grad is None  # the router reads the layer input detached


def test_routing_loss_with_a_learned_route_and_focus_rows():
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=2)
    q, k = torch.randn(1, 130, 4, 8), torch.randn(1, 130, 2, 8)
    rq = torch.randn(1, 130, 2, 8, requires_grad=True)
    rk = torch.randn(1, 130, 2, 8, requires_grad=True)
    loss = routing_distillation_loss(q, k, config, 0.35, num_queries=4, route=(rq, rk))
    loss.backward()
    assert rq.grad.abs().sum() > 0 and rk.grad.abs().sum() > 0
    # The shared router is the learned one with rq = the group's mean query and rk = k.
    same = routing_distillation_loss(q, k, config, 0.35, 4, route=(q.view(1, 130, 2, 2, 8).mean(3), k))
    assert float(same) == pytest.approx(float(routing_distillation_loss(q, k, config, 0.35, 4)), rel=1e-5)
    # Focus rows join the evenly spaced ones (one here: the first row with a candidate, 48); rows
    # without candidates (3) are dropped. Rows 48 and 100 are what 2 evenly spaced rows of the first
    # 101 tokens are.
    focused = routing_distillation_loss(q, k, config, 0.35, 1, focus=torch.tensor([3, 100]))
    same_rows = routing_distillation_loss(q[:, :101], k[:, :101], config, 0.35, 2)
    assert float(focused) == pytest.approx(float(same_rows), rel=1e-5) and float(focused) > 0


@pytest.mark.parametrize("ssa", [{}, MAX_SUMMARY], ids=["mean", "max"])
def test_training_the_router_raises_recall_of_its_own_selections(ssa):
    # The attention is fixed and sharp; 60 steps of the router loss alone must make the learned
    # router's selections capture more of the dense mass than its random start did.
    torch.manual_seed(1)
    model = make_model(ssa=ssa)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    ids = torch.randint(0, 256, (2, 256))
    before = recall(model, ids[:1])["mean"]
    model.train()
    model.enable_routing_loss(1.0, num_queries=64)
    routers = [p for n, p in model.named_parameters() if "router_" in n]
    optimizer = torch.optim.Adam(routers, lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = recall(model, ids[:1])
    assert result["mean"] > before + 0.05, (before, result["mean"])
    # The tree index does not take summary="max": no agreement to report.
    assert (result["index_agreement"] is None) == bool(ssa)
