"""The recall loss (``models/recall_loss.py``) against the recall evaluator, and in the model."""

import pytest
import torch

import subquad
from subquad.eval.recall import local_rope_recall
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.recall_loss import selection_recall_loss
from subquad.ops.ssa.select import select_blocks


def _rotate(x, positions):
    """A plain RoPE: ``x [..., D]`` rotated by ``positions`` (broadcastable to ``x.shape[:-1]``)."""
    half = x.shape[-1] // 2
    angle = positions[..., None].float() * 100.0 ** (-torch.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)


def _evaluator_loss(q, k, selection, rows, scale, rotary):
    """``-log`` recall from the evaluator (every row, then the chosen ones), differentiable as well."""
    if rotary:
        recall = local_rope_recall(q, k, selection, _rotate, 1, 2, scale=scale, reduction="none")
    else:
        recall = subquad.attention_recall(q, k, selection, scale=scale, reduction="none")
    return -recall[:, rows].log().mean()


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("seq_len,heads", [(150, (4, 2)), (131, (3, 1))])
def test_matches_the_recall_evaluator_with_gradients(rotary, seq_len, heads):
    generator = torch.Generator().manual_seed(seq_len)
    q = (1.5 * torch.randn(2, seq_len, heads[0], 8, generator=generator)).requires_grad_(True)
    k = (1.5 * torch.randn(2, seq_len, heads[1], 8, generator=generator)).requires_grad_(True)
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=2)
    selection = select_blocks(q.detach(), k.detach(), config)
    rows = torch.tensor([seq_len - 1, 48, 77, 100, 49])  # any order; rows 48-49 route nothing yet
    scale = 8**-0.5
    local_rotary = (_rotate, 1, 2) if rotary else None
    ours = selection_recall_loss(q, k, selection.block_idx, 16, scale, rows, local_rotary)
    grads = torch.autograd.grad(ours, (q, k))
    expected = _evaluator_loss(q, k, selection, rows, scale, rotary)
    expected_grads = torch.autograd.grad(expected, (q, k))
    assert ours.item() > 0.05  # the budget leaves mass outside the selection
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_minimising_it_concentrates_attention_on_the_selection():
    # q and k learned for this loss alone, the selection re-routed each step: the recall must rise.
    config = subquad.SSAConfig(block_size=16, top_k=2, sink_blocks=1, local_blocks=1)
    q = torch.randn(1, 160, 2, 8).requires_grad_(True)
    k = torch.randn(1, 160, 1, 8).requires_grad_(True)
    rows = torch.arange(32, 160, 9)
    optimizer = torch.optim.Adam([q, k], lr=0.05)
    losses = []
    for _ in range(40):
        selection = select_blocks(q.detach(), k.detach(), config)
        loss = selection_recall_loss(q, k, selection.block_idx, 16, 8**-0.5, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_no_rows_and_bad_shapes():
    q, k = torch.randn(1, 40, 2, 8), torch.randn(1, 40, 1, 8)
    selection = select_blocks(q, k, subquad.SSAConfig(block_size=16, top_k=1, sink_blocks=1, local_blocks=1))
    assert selection_recall_loss(q, k, selection.block_idx, 16, 0.3, torch.zeros(0, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="T == S"):
        selection_recall_loss(q[:, :20], k, selection.block_idx, 16, 0.3, torch.tensor([5]))


def _debug_model(scheme="local_rope", router="shared", attention="ssa"):
    config = SubquadConfig.from_flavor(
        "debug", attention=attention, position_scheme=scheme, router=router, eos_token_id=1
    )
    model = SubquadForCausalLM(config)
    with torch.no_grad():  # sharper attention than at init, so mass falls outside the selection unevenly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


@pytest.mark.parametrize("scheme,router", [("local_rope", "learned"), ("rope", "shared")])
def test_model_adds_it_to_the_training_loss_only(scheme, router):
    model = _debug_model(scheme, router)
    ids = torch.randint(3, model.config.vocab_size, (2, 120))
    ids[:, 90] = model.config.eos_token_id  # focus rows before an end of document
    model.train()
    plain = float(model(input_ids=ids, labels=ids).loss.detach())
    model.enable_recall_loss(0.5, num_queries=8)
    with_recall = model(input_ids=ids, labels=ids).loss
    assert model.last_recall_loss is not None and model.last_recall_loss.item() > 0
    assert with_recall.item() == pytest.approx(plain + 0.5 * model.last_recall_loss.item(), rel=1e-5)
    with_recall.backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    if router == "learned":  # the selection is discrete: nothing of this loss reaches the router
        assert attn.router_q_proj.weight.grad is None
    model.eval()
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(plain, rel=1e-5)
    model.train()
    model.enable_recall_loss(0.0)
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain, rel=1e-5)


def test_the_model_loss_is_the_layers_mean_recall_loss():
    # One layer's term by hand: its q/k captured in the forward, its selection recomputed.
    model = _debug_model("local_rope").train()
    model.enable_recall_loss(1.0, num_queries=6)
    ids = torch.randint(3, model.config.vocab_size, (1, 100))
    captured = []
    attn = model.model.layers[1].self_attn
    original = attn._attend_sparse

    def capture(q, k, v, summaries, route=None):
        captured.append((q.detach(), k.detach(), route))
        return original(q, k, v, summaries, route)

    attn._attend_sparse = capture
    model.model(input_ids=ids, use_cache=False)  # the decoder alone: the LM head's forward would collect it
    term = attn.recall_loss
    q, k, route = captured[0]
    ssa = model.config.ssa_config
    selection = attn.select(q, k, None, route)
    first = (ssa.sink_blocks + ssa.local_blocks) * ssa.block_size
    rows = torch.linspace(first, 99, 6).long().unique()
    expected = -local_rope_recall(
        q, k, selection, attn.rotary, ssa.sink_blocks, ssa.local_blocks, scale=attn.scale, reduction="none"
    )[:, rows].log().mean()  # fmt: skip
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)


def test_enable_recall_loss_validates():
    model = _debug_model()
    with pytest.raises(ValueError, match="weight=-1.0"):
        model.enable_recall_loss(-1.0)
    with pytest.raises(ValueError, match="num_queries=0"):
        model.enable_recall_loss(0.1, num_queries=0)
    with pytest.raises(ValueError, match="needs attention='ssa'"):
        _debug_model(attention="dense").enable_recall_loss(0.1)
