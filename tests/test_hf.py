"""attn_implementation="ssa" on transformers architectures (tiny random configs, nothing downloaded)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import subquad
import subquad.hf
from subquad.cache import CACHE_KWARG
from subquad.ops.ssa.triton_decode import decode_plan

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
FULL_BUDGET = dict(block_size=16, top_k=64, sink_blocks=1, local_blocks=2)
SPARSE = dict(block_size=16, top_k=2, sink_blocks=1, local_blocks=2)


def configs():
    return {
        "llama": LlamaConfig(**COMMON),
        # Windows shorter than the prompt: the sliding-window path is exercised.
        "mistral": MistralConfig(**COMMON, sliding_window=40),
        "qwen2": Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=40, max_window_layers=1),
        "qwen3": Qwen3Config(**COMMON, head_dim=16),
    }


def pair(cfg, ssa):
    subquad.hf.register()
    cfg = copy.deepcopy(cfg)
    cfg.ssa = ssa
    torch.manual_seed(0)
    # Separate config copies: from_config writes the attention implementation into the config.
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    sparse = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ssa").eval()
    sparse.load_state_dict(eager.state_dict())
    assert sparse.config._attn_implementation == "ssa"
    return eager, sparse


def left_padded(batch=2, length=70, pad=9):
    ids = torch.randint(0, 128, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_ssa_equals_eager_at_full_budget(arch):
    eager, sparse = pair(configs()[arch], FULL_BUDGET)
    ids, mask = left_padded()
    with torch.no_grad():
        want = eager(ids, attention_mask=mask).logits
        got = sparse(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = eager.generate(ids, **kw)
    assert torch.equal(sparse.generate(ids, **kw), expected)
    assert torch.equal(sparse.generate(ids, **{CACHE_KWARG: subquad.SSACache(sparse.config)}, **kw), expected)


@pytest.mark.parametrize(
    "arch,index,summary",
    [("llama", "flat", {}), ("qwen3", "flat", {}), ("llama", "tree", {}), ("llama", "beam", {}),
     ("llama", "flat", {"summary": "max", "sub_block_size": 4})],
    ids=["llama", "qwen3", "llama-tree", "llama-beam", "llama-max"],
)  # fmt: skip
def test_sparse_incremental_decoding_equals_full_forward(arch, index, summary, monkeypatch):
    tree_group = 2 if index != "flat" else None
    eager, sparse = pair(configs()[arch], {**SPARSE, "index": index, "tree_group": tree_group, **summary})
    ids = torch.randint(0, 128, (2, 150))
    plans = []
    monkeypatch.setattr(subquad.hf, "decode_plan", lambda *a, **kw: plans.append(1) or decode_plan(*a, **kw))
    with torch.no_grad():
        full = sparse(ids).logits
        assert (full - eager(ids).logits).abs().max() > 1e-4  # the budget really is sparse
        cache = subquad.SSACache(sparse.config)
        steps = [sparse(ids[:, :100], use_cache=True, **{CACHE_KWARG: cache}).logits]
        for i in range(100, 150):
            steps.append(sparse(ids[:, i : i + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)
    # Decode steps over the cache: one routing plan per step shared by both layers; the tree router's
    # group bounds kept per layer.
    assert len(plans) == 50
    if index == "tree":
        assert all(layer.derived["tree_bounds"].done > 0 for layer in cache.layers)


def test_chunked_prefill_on_transformers_model():
    _, sparse = pair(configs()["llama"], SPARSE)
    ids = torch.randint(0, 128, (1, 130))
    with torch.no_grad():
        full = sparse(ids).logits
        out = subquad.models.prefill(sparse, ids, chunk_size=48, logits_to_keep=3, progress=False)
    torch.testing.assert_close(out.logits, full[:, -3:], atol=2e-5, rtol=1e-4)


def test_register_is_idempotent_and_default_is_used():
    subquad.hf.register()
    subquad.hf.register(default={"block_size": 32, "top_k": 1})
    try:
        assert subquad.hf.ssa_config_for(LlamaConfig(**COMMON)).block_size == 32
        cfg = LlamaConfig(**COMMON)
        cfg.ssa = {"block_size": 16}
        assert subquad.hf.ssa_config_for(cfg).block_size == 16
    finally:
        subquad.hf.register(default=subquad.SSAConfig())


def test_padding_with_holes_is_rejected():
    _, sparse = pair(configs()["llama"], FULL_BUDGET)
    ids = torch.randint(0, 128, (1, 20))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding between real tokens"):
        sparse(ids, attention_mask=mask)


def shifted_logit_drift(model, ids, shift):
    """Largest logit change when every position moves by ``shift`` (rotary reads offsets alone)."""
    near = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        moved = model(ids, position_ids=near + shift).logits
        return (moved - model(ids, position_ids=near).logits).abs().max()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_precise_rotary_keeps_offsets_at_12m_positions(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[arch], attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (1, 37))
    with torch.no_grad():
        logits = model(ids).logits
    drift = shifted_logit_drift(model, ids, 12_000_000)
    assert subquad.hf.precise_rotary(model) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
    precise_drift = shifted_logit_drift(model, ids, 12_000_000)
    assert precise_drift < 1e-5  # measured ~2e-7 (float32 noise)
    # The model's own float32 angles drift there (measured 3e-4 to 1e-2 on these tiny random models):
    # what makes this test able to fail.
    assert drift > 1e-4
    assert subquad.hf.precise_rotary(model) == 0  # idempotent


@pytest.mark.parametrize(
    "rope",
    [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "linear", "factor": 4.0}],
)
def test_precise_rotary_keeps_scaled_and_dynamic_frequencies(rope):
    cfg = LlamaConfig(**COMMON, rope_parameters={"rope_theta": 10000.0, **rope})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    reference = copy.deepcopy(model)
    subquad.hf.precise_rotary(model)
    ids = torch.randint(0, 128, (1, 700))  # past max_position_embeddings: the dynamic update runs
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_precise_rotary_rejects_what_it_cannot_change():
    with pytest.raises(TypeError, match="model"):
        subquad.hf.precise_rotary("llama")
    with pytest.raises(ValueError, match="no rotary module"):
        subquad.hf.precise_rotary(torch.nn.Linear(4, 4))


class InterleavedRotary(torch.nn.Module):
    """A rotary module of another layout (pairs interleaved): precise_rotary must not replace it."""

    def __init__(self):
        super().__init__()
        self.inv_freq = 10000.0 ** (-torch.arange(0, 8) / 8)
        self.attention_scaling = 1.0
        self.rope_type = "default"

    def forward(self, x, position_ids):
        angles = (position_ids[..., None].float() * self.inv_freq).repeat_interleave(2, dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def test_precise_rotary_leaves_a_rotary_module_of_another_form():
    module = InterleavedRotary()
    with pytest.raises(ValueError, match="InterleavedRotary computes other tables"):
        subquad.hf.precise_rotary(torch.nn.Sequential(module))
    assert "forward" not in vars(module)
