"""Chunked prefill: feed a long prompt through a KV cache a chunk at a time.

Attention over a chunk of ``C`` queries against ``S`` cached keys costs memory ``O(C * budget)``
with SSA, and the MLPs see ``C`` tokens at a time, so a million-token prompt needs memory linear in
its length (the cache) plus a constant per chunk. Logits are computed only for the positions asked
for (``logits_to_keep``; the last one for generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import CausalLMOutputWithPast

from subquad.cache import CACHE_KWARG, SSACache

# Prompts at least this long show a progress bar by default.
_PROGRESS_MIN_TOKENS = 1 << 17
# What ``progress=None`` means inside :func:`prefill_progress` (None: by prompt length).
_progress_default: bool | None = None


@contextlib.contextmanager
def prefill_progress(show: bool | None) -> Iterator[None]:
    """Within the block, prefills not given ``progress`` show (``True``) or hide (``False``) their bar.

    For callers that reach :func:`prefill` through ``generate()`` or a model's forward, which take
    no ``progress`` argument: ``subquad eval --no-progress`` hides the per-prompt bars this way.
    """
    global _progress_default
    before, _progress_default = _progress_default, show
    try:
        yield
    finally:
        _progress_default = before


def prefill(
    model: Any,
    input_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
    progress: bool | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """Prefill ``input_ids [B, T]`` into ``cache`` chunk by chunk; return logits for the last positions.

    Works for Subquad models and for transformers models loaded with ``attn_implementation="ssa"``
    (or any attention). Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, the cache (``past_key_values``, or
            ``cache`` as newer transformers name it), ``use_cache`` and ``logits_to_keep``.
        chunk_size: tokens per forward (default ``model.config.prefill_chunk_tokens`` or 32768).
        cache: the cache to fill (default a new :class:`subquad.SSACache` sized for the prompt).
        attention_mask: ``[B, T]`` padding mask (1 = token), optional.
        logits_to_keep: logits for the last ``n`` positions (``0`` = all positions, memory ``T * vocab``).
        progress: show a tqdm bar (default: prompts of 128K tokens or more, unless set by
            :func:`prefill_progress`).
    Returns ``CausalLMOutputWithPast(logits=[B, n, vocab])`` with the cache in its ``past_key_values``
    (in newer transformers: ``cache``) field.
    """
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or (input_ids is not None and inputs_embeds is not None):
        raise ValueError("input_ids / inputs_embeds: expected exactly one of them")
    if tokens.dim() < 2 or tokens.shape[1] == 0:
        raise ValueError(f"input_ids: shape {tuple(tokens.shape)}, expected [batch, length >= 1]")
    if chunk_size is None:
        chunk_size = getattr(model.config, "prefill_chunk_tokens", 32768)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep={logits_to_keep!r}: expected an int >= 0 (0 = all positions)")
    total = tokens.shape[1]
    if cache is None:
        past = 0
        cache = SSACache(model.config, max_length=total + 1024)
    else:
        past = cache.get_seq_length()
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if len(shape) != 2 or shape[0] != tokens.shape[0] or shape[1] not in (total, past + total):
            raise ValueError(
                f"attention_mask: shape {shape}, expected [{tokens.shape[0]}, {total} or {past + total}] "
                "(batch, prompt or past + prompt)"
            )
        if bool(attention_mask.all()):
            # Nothing padded: one host read here, before any work is queued, instead of one per chunk
            # in the model (a GPU host would wait there for the chunk before).
            attention_mask = None
    if attention_mask is not None and attention_mask.shape[1] == total and past:
        ones = attention_mask.new_ones(attention_mask.shape[0], past)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    first_kept = 0 if logits_to_keep == 0 else max(0, total - logits_to_keep)
    if progress is None:
        progress = _progress_default
    show = total >= _PROGRESS_MIN_TOKENS if progress is None else progress
    logits = []
    with tqdm(total=total, unit="tok", unit_scale=True, desc="prefill", disable=not show) as bar:
        for start in range(0, total, chunk_size):
            stop = min(total, start + chunk_size)
            keep = max(0, stop - max(start, first_kept))
            chunk = (
                {"input_ids": input_ids[:, start:stop]}
                if input_ids is not None
                else {"inputs_embeds": inputs_embeds[:, start:stop]}
            )
            mask = None if attention_mask is None else attention_mask[:, : past + stop]
            # Intermediate chunks keep one logit (transformers reads 0 as "all"): a [B, 1, V] matmul.
            out = _forward(model, chunk, mask, cache, keep or 1)
            if keep:
                logits.append(out.logits[:, -keep:])
            bar.update(stop - start)
    return CausalLMOutputWithPast(logits=torch.cat(logits, dim=1), **{CACHE_KWARG: cache})


def _forward(model, chunk, mask, cache, keep):
    # Subquad models would re-enter prefill for a chunk longer than their own chunk size: call the core.
    from subquad.models.subquad.modeling import SubquadForCausalLM

    if isinstance(model, SubquadForCausalLM):
        hidden = model.model(**chunk, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
        return CausalLMOutputWithPast(logits=model.lm_head(hidden.last_hidden_state[:, -keep:]))
    return model(**chunk, attention_mask=mask, use_cache=True, logits_to_keep=keep, **{CACHE_KWARG: cache})
