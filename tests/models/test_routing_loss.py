"""The router loss (``models/routing_loss.py``) against a row-by-row reference, and in the model."""

import pytest
import torch

import subquad
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.routing_loss import routing_distillation_loss


def _reference(q, k, config, scale, rows, temperature=1.0):
    """Row by row, head by head, with explicit candidate lists."""
    heads_q, heads_kv, bs = q.shape[2], k.shape[2], config.block_size
    group = heads_q // heads_kv
    total, count = 0.0, 0
    for b in range(q.shape[0]):
        for h in range(heads_kv):
            for row in rows:
                candidates = list(range(config.sink_blocks, row // bs - config.local_blocks + 1))
                keys = torch.cat([k[b, c * bs : (c + 1) * bs, h] for c in candidates]).float()
                target = torch.zeros(len(candidates))
                for g in range(group):
                    probs = torch.softmax(q[b, row, h * group + g].float() @ keys.T * scale, dim=0)
                    target += probs.view(len(candidates), bs).sum(1) / group
                target = target ** (1 / temperature) / (target ** (1 / temperature)).sum()
                route = q[b, row, h * group : (h + 1) * group].float().mean(0)
                sub = config.summary_size  # "max": a block scores as its best sub-block
                sub_means = [[k[b, s : s + sub, h].float().mean(0) for s in range(c * bs, (c + 1) * bs, sub)]
                             for c in candidates]  # fmt: skip
                scores = torch.tensor([max(float(m @ route) for m in means) for means in sub_means])
                log_router = torch.log_softmax(scores * scale, dim=0)
                total += float((target * (target.log() - log_router)).sum())
                count += 1
    return total / count


@pytest.mark.parametrize(
    "seq_len,heads,temperature,sub",
    [(100, (4, 2), 1.0, None), (161, (3, 1), 1.0, None), (133, (4, 2), 0.4, None), (147, (4, 2), 1.0, 4)],
)
def test_matches_row_by_row_reference(seq_len, heads, temperature, sub):
    summary = {} if sub is None else {"summary": "max", "sub_block_size": sub}
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=2, **summary)
    q = 2 * torch.randn(2, seq_len, heads[0], 8)
    k = torch.randn(2, seq_len, heads[1], 8)
    first = (config.sink_blocks + config.local_blocks) * config.block_size
    rows = torch.linspace(first, seq_len - 1, 7).long().unique().tolist()
    loss = routing_distillation_loss(q, k, config, scale=8**-0.5, num_queries=7, temperature=temperature)
    assert float(loss) == pytest.approx(_reference(q, k, config, 8**-0.5, rows, temperature), rel=1e-4)
    assert float(loss) > 0


def test_a_sharper_target_weighs_the_heaviest_blocks_more():
    # One block holds keys aligned with the query: sharpening moves the target's mass onto it, so a
    # router that scores every block alike pays more for ignoring it.
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=1)
    q = torch.randn(1, 120, 2, 8)
    k = torch.randn(1, 120, 1, 8)
    k[0, 32:48, 0] = 2 * q[0, 119].mean(0)
    flat = (torch.zeros_like(q), torch.zeros_like(k))  # a router with no preference
    rows = torch.tensor([119])
    losses = [
        float(routing_distillation_loss(q, k, config, 0.35, 1, route=flat, focus=rows, temperature=t))
        for t in (1.0, 0.5, 0.25)
    ]
    assert losses[0] < losses[1] < losses[2]
    with pytest.raises(ValueError, match="temperature=0"):
        routing_distillation_loss(q, k, config, 0.35, 1, temperature=0)


def test_gradients_reach_q_and_k_and_short_sequences_give_none():
    config = subquad.SSAConfig(block_size=16, top_k=2)
    q = torch.randn(1, 90, 4, 8, requires_grad=True)
    k = torch.randn(1, 90, 2, 8, requires_grad=True)
    routing_distillation_loss(q, k, config, scale=0.35, num_queries=5).backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    assert routing_distillation_loss(q[:, :48], k[:, :48], config, 0.35, 5) is None  # no candidates yet


def test_minimising_it_lifts_the_dense_mass_blocks():
    # Learn q and k for the router loss alone: the loss must fall (it can: the target is fixed at
    # each step and the router distribution is free to follow it).
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=1)
    q = (3 * torch.randn(1, 160, 2, 8)).requires_grad_(True)
    k = torch.randn(1, 160, 1, 8, requires_grad=True)
    optimizer = torch.optim.Adam([q, k], lr=0.05)
    losses = []
    for _ in range(40):
        loss = routing_distillation_loss(q, k, config, scale=8**-0.5, num_queries=16)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _debug_model(attention="ssa"):
    if attention == "ssa":
        config = SubquadConfig.from_flavor("debug")
    else:
        config = SubquadConfig.from_flavor("debug", attention=attention, position_scheme="rope")
    model = SubquadForCausalLM(config)
    with torch.no_grad():  # sharper attention than at init, so the dense block mass is not uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def test_model_adds_it_to_the_training_loss_only():
    model = _debug_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 120))
    model.train()
    plain = float(model(input_ids=ids, labels=ids).loss.detach())
    model.enable_routing_loss(0.5, num_queries=8)
    with_router = model(input_ids=ids, labels=ids).loss
    assert model.last_routing_loss is not None and model.last_routing_loss.item() > 0
    assert with_router.item() == pytest.approx(plain + 0.5 * model.last_routing_loss.item(), rel=1e-5)
    with_router.backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(plain, rel=1e-5)
    model.train()
    model.enable_routing_loss(0.0)
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain, rel=1e-5)


def test_enable_routing_loss_validates():
    model = _debug_model()
    with pytest.raises(ValueError, match="weight"):
        model.enable_routing_loss(-1.0)
    with pytest.raises(ValueError, match="num_queries"):
        model.enable_routing_loss(0.1, num_queries=0)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        model.enable_routing_loss(0.1, temperature=-0.5)
    with pytest.raises(ValueError, match="needs attention='ssa'"):
        _debug_model("dense").enable_routing_loss(0.1)
