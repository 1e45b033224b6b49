"""``attn_implementation="ssa"`` for existing transformers models (Llama, Mistral, Qwen2, Qwen3, ...).

``register()`` adds ``"ssa"`` to transformers' attention interface and its mask interface:

    import subquad.hf
    subquad.hf.register()                       # or register(default={"top_k": 32})
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ssa")

SSA settings: ``model.config.ssa`` (a dict of ``SSAConfig`` fields) if present, else the default
given to ``register`` (else ``SSAConfig()``). The model keeps its own rotary scheme; past a few
million positions call ``precise_rotary(model)``, whose float64 angles keep nearby tokens' offsets (the
model's own float32 angles drift by up to 0.5 rad at 12M positions).

Masks. The ``"ssa"`` mask function returns ``None`` when nothing is padded, else a boolean
``[B, 1, 1, S]`` key mask (True = real token): SSA is causal by construction, so only padding needs
passing, and no ``[T, S]`` mask is ever built (a 1M-token prompt would need a terabyte). Rows with
padding run one at a time over their real tokens, so left padding in batched ``generate()`` gives
each row exactly what it gets alone (block boundaries start at its first real token). A row's real
tokens must be contiguous (left or right padding); a mask with holes is an error. A 4D mask passed by
the caller is reduced to its key padding the same way.

Sliding windows (``sliding_window`` passed by Mistral / Qwen2 layers) are kept: a selected key more
than ``window - 1`` positions back is masked; this runs on the torch path. With an
:class:`subquad.SSACache` the block summaries come from the cache (no per-step recomputation), and a
decode step builds its routing plan once for all layers and keeps the tree router's group bounds in
the cache between steps, as Subquad models do.
"""

from __future__ import annotations

from typing import Any

import torch

from subquad.ops import fused
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.interface import resolve_backend, ssa_attention
from subquad.ops.ssa.select import select_blocks
from subquad.ops.ssa.triton_decode import DecodePlan, decode_plan, decode_step, kept_index, ssa_decode

_DEFAULT: SSAConfig | None = None


def register(default: SSAConfig | dict[str, Any] | None = None) -> None:
    """Register ``"ssa"`` with transformers' attention and mask interfaces (idempotent).

    ``default``: SSA settings for models whose config has no ``ssa`` field.
    """
    global _DEFAULT
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if default is not None:
        _DEFAULT = SSAConfig.from_dict(default)
    AttentionInterface.register("ssa", ssa_attention_forward)
    AttentionMaskInterface.register("ssa", ssa_mask)


def default_ssa_config() -> SSAConfig:
    """The default given to :func:`register` (``SSAConfig()`` if none)."""
    return _DEFAULT if _DEFAULT is not None else SSAConfig()


def precise_rotary(model: torch.nn.Module) -> int:
    """Compute the rotary angles of ``model``'s rotary embeddings in float64, reduced mod 2 pi
    (:func:`subquad.ops.fused.rotary_angles`), as Subquad models do. Returns how many modules changed.

    transformers' rotary modules multiply ``position * inv_freq`` in float32, which rounds each angle by
    up to 0.5 rad at 12M positions (0.06 at 1M), so past a few million tokens a query and its nearby
    keys no longer see their true offset. The frequencies, the scaling and any dynamic frequency update
    stay the model's own. Each module's new forward is checked against its old one on the first 64
    positions first: a rotary module of another form raises ``ValueError`` instead of being changed.
    Idempotent.
    """
    from transformers.modeling_rope_utils import dynamic_rope_update

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    rotaries = [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")]
    if not rotaries:
        raise ValueError(
            f"model: {type(model).__name__} has no rotary module with inv_freq and attention_scaling "
            "(Llama-style); nothing to make precise"
        )
    forward = dynamic_rope_update(_precise_rotary_forward)
    changed = 0
    for module in rotaries:
        if getattr(module, "_subquad_precise_rotary", False):
            continue
        new = forward.__get__(module)
        inv_freq = module.inv_freq
        x = torch.ones(1, 64, inv_freq.numel() * 2, device=inv_freq.device)
        positions = torch.arange(64, device=inv_freq.device)[None]
        try:
            before, after = module(x, positions), new(x, positions)
            same = all(torch.allclose(b, a, atol=1e-5) for b, a in zip(before, after, strict=True))
        except Exception as error:  # a forward of another signature or layout
            raise ValueError(
                f"model: its {type(module).__name__} is not a Llama-style rotary module ({error})"
            ) from error
        if not same:
            raise ValueError(
                f"model: its {type(module).__name__} computes other tables than cos/sin of "
                "position * inv_freq; not changed"
            )
        module.forward = new
        module._subquad_precise_rotary = True
        changed += 1
    return changed


def _precise_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
    """A Llama-style rotary module's forward with :func:`~subquad.ops.fused.rotary_angles`."""
    if layer_type is not None:  # per-layer-type frequencies live under other names
        raise ValueError(f"layer_type: {layer_type!r}; precise_rotary handles one set of frequencies")
    angles = fused.rotary_angles(position_ids, self.inv_freq.to(x.device))
    angles = torch.cat((angles, angles), dim=-1)
    return (
        (angles.cos() * self.attention_scaling).to(x.dtype),
        (angles.sin() * self.attention_scaling).to(x.dtype),
    )


def ssa_config_for(config: Any) -> SSAConfig:
    """SSA settings of a transformers config: its ``ssa`` field, else the registered default."""
    ssa = getattr(config, "ssa", None)
    return default_ssa_config() if ssa is None else SSAConfig.from_dict(ssa)


def ssa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask interface entry: ``None`` without padding, else a ``[B, 1, 1, kv_length]`` bool key mask."""
    if attention_mask is None:
        return None
    padding = attention_mask.bool()
    if padding.shape[-1] < kv_offset + kv_length:
        # As transformers does: positions the 2D mask does not cover yet are not attended.
        padding = torch.nn.functional.pad(padding, (0, kv_offset + kv_length - padding.shape[-1]))
    padding = padding[:, kv_offset : kv_offset + kv_length]
    if bool(padding.all()):
        return None
    return padding[:, None, None, :]


def _key_padding(attention_mask: torch.Tensor | None, seq_len_k: int) -> torch.Tensor | None:
    """``[B, S]`` bool of attendable keys from whatever mask arrived, or None (nothing padded)."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() != 4:
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)}, expected [B, 1, T or 1, S] or None")
    if mask.dtype != torch.bool:
        # Additive float masks: 0 = attend, large negative = masked.
        mask = mask > torch.finfo(mask.dtype).min / 2
    keys = mask[..., -seq_len_k:].any(dim=-2).any(dim=1)  # a key any query may see is a real token
    return None if bool(keys.all()) else keys


def ssa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]`` ->
    (``[B, T, Hq, Dv]``, None). GQA needs no repeat: SSA groups query heads per KV head itself."""
    if softcap is not None:
        raise ValueError(f"softcap={softcap}: SSA attention does not support logit soft-capping; use 'eager'")
    if dropout and module.training:
        raise ValueError(
            f"dropout={dropout}: SSA attention has no attention dropout; set attention_dropout=0"
        )
    config = ssa_config_for(getattr(module, "config", None))
    causal = bool(getattr(module, "is_causal", True))
    q = query.transpose(1, 2)  # [B, T, Hq, D] views, no copies
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    batch, steps = q.shape[:2]
    seq_len = k.shape[1]
    layer = getattr(key, "_subquad_cache_layer", None)
    summaries = layer.summaries() if layer is not None else None
    if summaries is not None and summaries.shape[1] != -(-seq_len // config.summary_size):
        summaries = None  # the cache summarises other spans than this layer's settings route by
    window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
    keys = _key_padding(attention_mask, seq_len)
    if keys is None:
        if summaries is not None and steps == 1 and causal and window is None:
            return _decode_from_cache(q, k, v, config, scaling, layer, summaries), None
        out = _attend(q, k, v, config, scaling, causal, window, summaries)
        return out, None
    out = q.new_zeros(batch, steps, q.shape[2], v.shape[-1])
    starts = keys.float().argmax(dim=1).tolist()  # first real key per row
    counts = keys.sum(dim=1).tolist()
    for row in range(batch):
        start, count = starts[row], counts[row]
        stop = start + count
        if count == 0:
            continue
        if not bool(keys[row, start:stop].all()):
            raise ValueError(
                f"attention_mask: row {row} has padding between real tokens; SSA needs each row's real "
                "tokens contiguous (left or right padding)"
            )
        # Query i sits at key position S - T + i; keep the queries whose position is a real token.
        q_lo, q_hi = max(0, start - (seq_len - steps)), stop - (seq_len - steps)
        if q_hi <= q_lo:
            continue
        out[row, q_lo:q_hi] = _attend(
            q[row : row + 1, q_lo:q_hi],
            k[row : row + 1, start:stop],
            v[row : row + 1, start:stop],
            config,
            scaling,
            causal,
            window,
            None,
        )[0]
    return out, None


def _decode_from_cache(q, k, v, config, scale, layer, summaries) -> torch.Tensor:
    """One new token per row over an :class:`subquad.SSACache` layer, as ``ssa_decode`` but with the
    step's routing plan built once for all layers (``layer.shared``) and the tree's or the beam's node
    bounds kept in the layer across steps (``kept_index``), as Subquad models decode."""
    batch, seq_len = k.shape[:2]
    key = (config, batch, seq_len, summaries.shape[1], q.device)
    kept = layer.shared.get("hf_decode_plan")
    if kept is not None and kept[0] == key:
        plan = kept[1]
    else:
        seqlens = torch.full((batch,), seq_len, dtype=torch.int32, device=q.device)
        previous: DecodePlan | None = None if kept is None else kept[1]
        num_blocks = -(-seq_len // config.block_size)
        plan = decode_plan(seqlens, num_blocks, config, [seq_len] * batch, previous=previous)
        layer.shared["hf_decode_plan"] = (key, plan)
    bounds = kept_index(layer.derived, config)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return decode_step(q, k, v, summaries, plan, config, scale, resolve_backend("auto", q, v), bounds)[0]


def _attend(q, k, v, config, scale, causal, window, summaries) -> torch.Tensor:
    if window is None and causal and q.shape[1] == 1:
        # One new token: the split-K decode kernel on CUDA (same selection and result as ssa_attention).
        return ssa_decode(q, k, v, config, summaries=summaries, scale=scale)
    if window is None:
        return ssa_attention(q, k, v, config=config, causal=causal, scale=scale, summaries=summaries)
    from subquad.models.sparse_torch import sparse_attention_torch

    with torch.no_grad():
        selection = select_blocks(q.detach(), k.detach(), config, causal=causal, summaries=summaries)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sparse_attention_torch(q, k, v, selection.block_idx, config.block_size, scale, causal=causal,
                                  sliding_window=window)  # fmt: skip
