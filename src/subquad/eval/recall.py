"""Attention recall of a Subquad model's own selections on real text.

The recall of a layer is the share of the *dense* softmax mass (every causal key) that falls on the
keys the model actually selects, per query head, averaged over query positions. It is measured on
the q and k the attention layer sees in a normal forward: the model runs once, every layer's
selection is recomputed the way the layer routes (``SubquadAttention.select``: those q/k, or the
layer's learned router) and compared with dense attention computed blockwise (no ``[T, S]`` tensor
is ever formed).

* ``position_scheme="rope"``: q and k are rotated; the recall is ``subquad.attention_recall``.
* ``position_scheme="local_rope"``: the model scores the keys of a token's local window with rotated
  q/k and every other key with unrotated q/k, all in one softmax. The dense equivalent keeps that
  rule for *all* causal keys (window keys rotated, the rest unrotated); the local window is always
  selected. See :func:`local_rope_recall`.

The **oracle recall** (``oracle_recall``, :func:`oracle_recall`) comes from the same dense pass: the
recall of the best selection of the same budget, the sink and local blocks the config forces plus,
per token and KV head, the ``top_k`` other causal blocks holding the most dense mass (mean over the
KV head's query heads, which share a selection). No router can do better at that budget, so
``recall / oracle_recall`` is the share of the reachable mass the router gets.

Two numbers about the operator on these real routing inputs come with it, per layer: the **tile
overhead** of the query-major kernel (blocks visited for all tokens of a query tile over blocks the
tokens chose; ``subquad.ops.ssa.tiles.tile_overhead``, i.i.d. random inputs being the worst case)
and the **index agreement**, the share of the flat router's routed blocks that a sub-linear index also
picks (``routing_agreement``): the model's own index, or the tree index when the model routes flat.

Command line::

    python -m subquad.eval.recall --model DIR --corpus CORPUS_DIR --length 32k --windows 4 \\
        --out recall.json [--device cuda] [--max-queries 512] [--ssa summary=mean]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from subquad._args import key_values
from subquad.eval import runner
from subquad.ops.ssa.interface import (
    _check_scale,
    _check_selection,
    check_max_queries,
    query_rows,
    validate_qkv,
)
from subquad.ops.ssa.select import SSASelection, routing_agreement, select_blocks
from subquad.ops.ssa.tiles import tile_overhead

# Elements of the largest fp32 temporary one chunk of queries may allocate (128 MiB).
_CHUNK_ELEMENTS = 1 << 25
# Keys scored per step of the dense pass (rounded down to whole blocks).
_KEY_CHUNK = 1 << 14

__all__ = [
    "evaluate_corpus",
    "local_rope_recall",
    "model_attention_recall",
    "oracle_recall",
    "query_rows",
    "recall_table",
    "window_starts",
]

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_inputs(q, k, selection, reduction: str, local_rotary) -> None:
    validate_qkv(q, k, k, causal=True)
    _check_selection(selection, q, k)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")
    if local_rotary is None:
        return
    _, sink_blocks, local_blocks = local_rotary
    for name, value in (("sink_blocks", sink_blocks), ("local_blocks", local_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an int >= 0")
    width = selection.block_idx.shape[-1]
    if sink_blocks + local_blocks > width or (
        selection.num_fixed_slots is not None and selection.num_fixed_slots != sink_blocks + local_blocks
    ):
        raise ValueError(
            f"sink_blocks={sink_blocks}, local_blocks={local_blocks}: the selection has {width} slots, "
            f"{selection.num_fixed_slots} of them fixed; expected sink + local fixed slots"
        )


def _recalls(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: SSASelection,
    scale: float | None,
    max_queries: int | None,
    local_rotary: tuple[Rotate, int, int] | None = None,
    oracle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recall of ``selection`` and, with ``oracle``, the oracle recall at its budget, both
    ``[B, T', Hq]``, from one blockwise dense pass (inputs already checked).

    ``local_rotary``: ``(rotate, sink_blocks, local_blocks)`` for ``local_rope`` scores
    (:func:`local_rope_recall`); None: every key scored ``q . k``.
    """
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = _check_scale(scale, dim)
    bs = selection.block_size
    num_blocks = -(-seq_len_k // bs)
    rows = query_rows(seq_len_q, max_queries, q.device)
    positions = rows + (seq_len_k - seq_len_q)
    rotate, sink_blocks, local_blocks = local_rotary if local_rotary is not None else (None, 0, 0)
    if oracle:
        fixed_slots = selection.num_fixed_slots
        if fixed_slots is None:
            raise ValueError(
                "selection.num_fixed_slots is None: the oracle recall keeps the selection's fixed (sink "
                "and local) slots and fills its routed ones; use a selection from select_blocks"
            )
        top_k = selection.block_idx.shape[-1] - fixed_slots

    pad = num_blocks * bs - seq_len_k
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad))
    kf_t = kf.permute(0, 2, 3, 1)  # [B, Hkv, D, S']
    k_heads = k.float().transpose(1, 2) if local_blocks else None  # [B, Hkv, S, D]
    key_pos = torch.arange(num_blocks * bs, device=q.device)
    block_start = key_pos[::bs]  # [NB]
    key_chunk_blocks = max(1, _KEY_CHUNK // bs)
    local_keys = local_blocks * bs
    per_row = batch * heads_q * max(key_chunk_blocks * bs, num_blocks + 1, local_keys)
    per_row = max(per_row, batch * heads_kv * local_keys * dim)
    query_chunk = max(1, _CHUNK_ELEMENTS // per_row)
    local_offsets = torch.arange(bs, device=q.device)
    out, out_oracle = [], []
    for start in range(0, rows.numel(), query_chunk):
        r = rows[start : start + query_chunk]
        p = positions[start : start + query_chunk]
        tc = r.numel()
        qc = q[:, r].float().view(batch, tc, heads_kv, group, dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,Tc,D]

        # Unrotated scores: one log-sum-exp per key block, [B, Hkv, G, Tc, NB].
        block_lse = []
        for kb in range(0, num_blocks, key_chunk_blocks):
            ke = min(num_blocks, kb + key_chunk_blocks)
            s = torch.matmul(qc, kf_t[:, :, None, :, kb * bs : ke * bs]) * scale
            kp = key_pos[kb * bs : ke * bs]
            s = s.masked_fill((kp >= seq_len_k) | (kp > p[:, None]), float("-inf"))
            block_lse.append(s.view(*s.shape[:-1], ke - kb, bs).logsumexp(-1))
        lse = torch.cat(block_lse, dim=-1)

        # Local window: rotated q against rotated keys of the local slots, [B, Hkv, G, Tc, L].
        if local_blocks:
            slots = slice(sink_blocks, sink_blocks + local_blocks)
            local = selection.block_idx[:, :, r, slots].long()  # [B, Hkv, Tc, L]
            lpos = (local[..., None] * bs + local_offsets).flatten(-2)  # [B, Hkv, Tc, L * bs]
            lvalid = (local >= 0).repeat_interleave(bs, dim=-1) & (lpos < seq_len_k) & (lpos <= p[:, None])
            gather = lpos.clamp(0, seq_len_k - 1)
            kg = k_heads.gather(2, gather.flatten(2)[..., None].expand(-1, -1, -1, dim))
            kg = rotate(kg.view(batch, heads_kv, tc, local_keys, dim), gather)
            q_rot = rotate(qc, p.view(1, 1, 1, tc))
            s = torch.einsum("bhgtd,bhtkd->bhgtk", q_rot, kg) * scale
            s = s.masked_fill(~lvalid[:, :, None], float("-inf"))
            local_lse = s.view(*s.shape[:-1], local_blocks, bs).logsumexp(-1)
            # Unused slots (-1) scatter into a spare column that is dropped afterwards.
            target = torch.where(local >= 0, local, num_blocks)[:, :, None].expand(-1, -1, group, -1, -1)
            lse = torch.nn.functional.pad(lse, (0, 1)).scatter(-1, target, local_lse)[..., :num_blocks]

        total = lse.logsumexp(-1)  # [B, Hkv, G, Tc]
        idx = selection.block_idx[:, :, r].long()[:, :, None].expand(-1, -1, group, -1, -1)
        picked = lse.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
        recall = (picked.logsumexp(-1) - total).exp()
        out.append(recall.permute(0, 3, 1, 2).reshape(batch, tc, heads_q))
        if not oracle:
            continue

        # Oracle: the selection's fixed slots, plus the top_k other causal blocks by the mean share of
        # dense mass over the KV head's query heads (they share one selection), [B, Hkv, Tc, NB].
        fixed = selection.block_idx[:, :, r, :fixed_slots].long()
        fixed = torch.where(fixed >= 0, fixed, num_blocks)
        chosen = torch.zeros(batch, heads_kv, tc, num_blocks + 1, dtype=torch.bool, device=q.device)
        chosen = chosen.scatter_(-1, fixed, True)[..., :num_blocks]
        k_eff = min(top_k, num_blocks)
        if k_eff:
            share = (lse - total[..., None]).exp().mean(2)
            causal_block = block_start <= p[:, None]  # [Tc, NB]: blocks holding a key the token sees
            share = share.masked_fill(chosen | ~causal_block, float("-inf"))
            values, order = share.topk(k_eff, dim=-1)
            chosen = chosen | torch.zeros_like(chosen).scatter_(-1, order, values > float("-inf"))
        kept = lse.masked_fill(~chosen[:, :, None], float("-inf"))
        best = (kept.logsumexp(-1) - total).exp()
        out_oracle.append(best.permute(0, 3, 1, 2).reshape(batch, tc, heads_q))
    return torch.cat(out, dim=1), torch.cat(out_oracle, dim=1) if oracle else None


def local_rope_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: SSASelection,
    rotate: Rotate,
    sink_blocks: int,
    local_blocks: int,
    scale: float | None = None,
    max_queries: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Recall of a causal ``local_rope`` selection: dense softmax mass inside the selection.

    q ``[B, T, Hq, D]`` and k ``[B, S, Hkv, D]`` are **unrotated**; query ``i`` sits at position
    ``S - T + i``. ``rotate(x, positions)`` rotates ``x [..., D]`` by ``positions`` (broadcastable to
    ``x.shape[:-1]``). The local window of a token is its selection's local slots
    ``[sink_blocks, sink_blocks + local_blocks)`` (see :class:`SSASelection`): keys there are scored
    ``rotate(q) . rotate(k)``, every other causal key ``q . k``, all in one softmax, exactly as the
    model's ``sparse_attention_torch(..., local_rotary=(rotate, sink_blocks, local_blocks))`` scores the
    keys it selects. Computed blockwise per chunk of queries: a log-sum-exp per key block from the
    unrotated scores, the local blocks' entries replaced by their rotated log-sum-exps.

    ``max_queries``: an evenly spaced subset of query rows. ``reduction="mean"`` returns a scalar,
    ``"none"`` ``[B, T', Hq]`` for the evaluated rows.
    """
    local_rotary = (rotate, sink_blocks, local_blocks)
    _check_inputs(q, k, selection, reduction, local_rotary)
    result, _ = _recalls(q, k, selection, scale, max_queries, local_rotary)
    return result.mean() if reduction == "mean" else result


def oracle_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: SSASelection,
    scale: float | None = None,
    max_queries: int | None = None,
    reduction: str = "mean",
    local_rotary: tuple[Rotate, int, int] | None = None,
) -> torch.Tensor:
    """Recall of the best causal selection with ``selection``'s budget: the upper bound of any router.

    Per token and KV head the selection's fixed slots (sink and local blocks, ``num_fixed_slots``
    leading slots) are kept and its ``top_k = K - num_fixed_slots`` routed slots are filled with the
    ``top_k`` other causal blocks that hold the most dense softmax mass, averaged over the KV head's
    query heads (they share one selection, as the model's do): this maximises the heads' mean recall,
    so per (token, KV head) the mean over its query heads is at least the recall of ``selection``
    (one head alone may lose). Computed blockwise from the same per-block log-sum-exps as the recall.

    q, k, ``scale``, ``max_queries``, ``reduction`` as :func:`subquad.attention_recall` (causal);
    ``local_rotary=(rotate, sink_blocks, local_blocks)`` scores keys as :func:`local_rope_recall` does
    (q and k then unrotated), None scores every key ``q . k``.
    """
    _check_inputs(q, k, selection, reduction, local_rotary)
    _, result = _recalls(q, k, selection, scale, max_queries, local_rotary, oracle=True)
    return result.mean() if reduction == "mean" else result


def _attention_modules(model: Any) -> list[Any]:
    from subquad.models.subquad.modeling import SubquadAttention

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "subquad":
        raise ValueError(f"model: expected a Subquad model (SubquadForCausalLM), got {type(model).__name__}")
    if config.attention != "ssa":
        raise ValueError(
            f"model: attention={config.attention!r}; recall needs an SSA model (attention='ssa'), "
            "a dense model attends to every key"
        )
    modules = [m for m in model.modules() if isinstance(m, SubquadAttention)]
    return sorted(modules, key=lambda m: m.layer_idx)


def _check_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers={layers!r}: expected a list of layer indices or None")
    chosen = list(layers)
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layers={chosen!r}: expected indices in [0, {num_layers - 1}]")
    if not chosen:
        raise ValueError("layers=[]: expected at least one layer index (or None for all)")
    return sorted(set(chosen))


def _keys_attended(selection: SSASelection, seq_len_k: int) -> float:
    """Selected causal (token, key) pairs over dense causal pairs, over every token and KV head."""
    selected = selection.num_selected_keys(seq_len_k, causal=True).double().sum()
    batch, heads_kv, seq_len_q, _ = selection.block_idx.shape
    first = seq_len_k - seq_len_q + 1  # keys visible to the first query
    dense = (first + seq_len_k) * seq_len_q / 2 * batch * heads_kv
    return float(selected / dense)


def _layer_recall(attn: Any, q, k, summaries, route, max_queries) -> dict[str, Any]:
    """One layer's attention inputs: per-head recall ``[Hq]`` (``"per_head"``) and oracle recall
    (``"oracle_per_head"``), ``"keys_attended"``, ``"rows"`` evaluated, ``"tile_overhead"`` and
    ``"index_agreement"`` (module docstring)."""
    config = attn.config
    ssa = config.ssa_config
    q, k = q.detach(), k.detach()
    selection = attn.select(q, k, summaries, route)
    # rope: q/k arrive rotated, every key scored q . k; local_rope: see local_rope_recall.
    local_rotary = None
    if config.position_scheme == "local_rope":
        local_rotary = (attn.rotary, ssa.sink_blocks, ssa.local_blocks)
    _check_inputs(q, k, selection, "none", local_rotary)
    recall, oracle = _recalls(q, k, selection, attn.scale, max_queries, local_rotary, oracle=True)
    # The same routing inputs through the other router, flat or (for a flat model) the tree (the layer's
    # own summaries are block means of whichever keys route, as select_blocks computes them when given
    # none); summary="max" routes flat only.
    agreement = None
    if ssa.summary == "mean":
        route_q, route_k = (q, k) if route is None else (route[0].detach(), route[1].detach())
        other = dataclasses.replace(ssa, index="tree" if ssa.index == "flat" else "flat")
        other_selection = select_blocks(route_q, route_k, other, causal=True, summaries=summaries)
        flat, index = (selection, other_selection) if ssa.index == "flat" else (other_selection, selection)
        agreement = routing_agreement(flat, index)
    from subquad.ops.ssa.triton_attention import tokens_per_tile  # imports triton: only when measuring

    group = q.shape[2] // k.shape[2]
    return {
        "per_head": recall.float().mean(dim=(0, 1)).cpu(),
        "oracle_per_head": oracle.float().mean(dim=(0, 1)).cpu(),
        "keys_attended": _keys_attended(selection, k.shape[1]),
        "rows": recall.shape[1],
        "tile_overhead": tile_overhead(selection.block_idx, tokens_per_tile(group)),
        "index_agreement": agreement,
    }


# Per-layer numbers besides the recall, averaged the same way over layers and windows.
_OPERATOR_STATS = ("keys_attended", "tile_overhead", "index_agreement")


def _mean_stat(values: list[float | None]) -> float | None:
    """Mean of a per-layer number; None when a layer has none (``summary="max"`` has no tree index)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def _stat_cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_attention_recall(
    model: Any,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    max_queries: int | None = None,
) -> dict[str, Any]:
    """Attention recall of an SSA ``SubquadForCausalLM``'s own selections on ``input_ids`` ``[1, T]``.

    The model runs once (``use_cache=False``, every layer in full). In each chosen layer the inputs of
    the sparse attention (``SubquadAttention._attend_sparse``: q and k as the attention sees them) are
    captured, the selection is recomputed the way the layer routes (``SubquadAttention.select``: its
    own q/k, or its learned router's), and the
    share of dense causal softmax mass on the selected keys is measured (``rope``: rotated q/k,
    :func:`subquad.attention_recall`; ``local_rope``: :func:`local_rope_recall`), with the
    oracle recall of the same budget (:func:`oracle_recall`) from the same dense pass. Each layer is
    measured during the forward, so only one layer's q/k are held at a time.

    ``layers``: layer indices (default all). ``max_queries``: evaluate an evenly spaced subset of
    query positions (dense mass costs ``O(T^2)`` per layer).

    Returns ``{"layers": [{"layer", "recall", "per_head", "oracle_recall", "oracle_per_head",
    "keys_attended", "tile_overhead", "index_agreement"}], "mean", "oracle_recall", "keys_attended",
    "tile_overhead", "index_agreement", "tokens", "queries", "position_scheme", "ssa"}``: ``recall``
    is a layer's mean over its query heads, ``mean`` the mean over layers, ``oracle_recall`` the same
    for the oracle selection (a layer's, then the mean over layers), ``keys_attended`` the selected
    causal (token, key) pairs over all causal pairs (every token of the sequence counted); the other
    two as in the module docstring, means over layers at the top level.
    """
    modules = _attention_modules(model)
    chosen = _check_layers(layers, len(modules))
    check_max_queries(max_queries)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a [batch, length] tensor of token ids, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: dtype {input_ids.dtype}, expected an integer (int64) tensor")
    vocab = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(
            f"input_ids: ids must lie in [0, {vocab - 1}] (the model's vocab_size={vocab}); got "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)

    results: dict[int, dict[str, Any]] = {}
    wrapped = []

    def capture(attn, original):
        def attend(q, k, v, summaries, route=None):
            out = original(q, k, v, summaries, route)
            with torch.no_grad():
                results[attn.layer_idx] = _layer_recall(attn, q, k, summaries, route, max_queries)
            return out

        return attend

    try:
        for attn in modules:
            if attn.layer_idx not in chosen:
                continue
            # The sparse part of the attention (its inputs are exactly what the model routes with);
            # older versions of the model only have ``_attend`` with the same signature.
            name = "_attend_sparse" if hasattr(attn, "_attend_sparse") else "_attend"
            previous = attn.__dict__.get(name)
            wrapped.append((attn, name, previous))
            setattr(attn, name, capture(attn, getattr(attn, name)))
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for attn, name, previous in reversed(wrapped):
            if previous is None:
                delattr(attn, name)
            else:
                setattr(attn, name, previous)

    missing = [i for i in chosen if i not in results]
    if missing:
        raise RuntimeError(f"layers {missing}: the sparse attention was not called in the forward")
    per_layer = []
    for layer in chosen:
        found = results[layer]
        per_layer.append(
            {
                "layer": layer,
                "recall": float(found["per_head"].mean()),
                "per_head": [float(x) for x in found["per_head"]],
                "oracle_recall": float(found["oracle_per_head"].mean()),
                "oracle_per_head": [float(x) for x in found["oracle_per_head"]],
                **{name: found[name] for name in _OPERATOR_STATS},
            }
        )
    return {
        "layers": per_layer,
        "mean": sum(row["recall"] for row in per_layer) / len(per_layer),
        "oracle_recall": sum(row["oracle_recall"] for row in per_layer) / len(per_layer),
        **{name: _mean_stat([row[name] for row in per_layer]) for name in _OPERATOR_STATS},
        "tokens": int(input_ids.shape[1]),
        "queries": results[chosen[0]]["rows"],
        "position_scheme": model.config.position_scheme,
        "ssa": model.config.ssa_config.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------
# Command line


def window_starts(num_tokens: int, length: int, windows: int) -> list[int]:
    """``windows`` evenly spaced starts of ``length``-token windows in a stream of ``num_tokens``."""
    if num_tokens < length:
        raise ValueError(f"length={length}: the stream holds only {num_tokens} tokens")
    if windows == 1:
        return [0]
    span = num_tokens - length
    return [round(i * span / (windows - 1)) for i in range(windows)]


def _load_model(path: str, device: str, dtype: str, ssa: dict[str, Any] | None = None):
    """The ``--model`` directory through the eval runner's loader (no tokenizer needed); ``ssa``:
    SSA settings replacing the saved ones."""
    if not Path(path).is_dir():
        raise ValueError(f"--model {path!r}: not a directory; expected a model saved with save_pretrained")
    try:
        return runner.load_causal_lm(path, device=device, dtype=dtype, ssa=ssa)
    except (OSError, KeyError) as error:
        raise ValueError(f"--model {path!r}: cannot load a model from it ({error})") from error


def evaluate_corpus(
    model: Any,
    corpus: str | Path,
    length: int,
    windows: int = 4,
    max_queries: int | None = None,
    layers: Iterable[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall over ``windows`` evenly spaced ``length``-token windows of ``corpus``'s held-out split.

    Per-layer and per-head recalls (router and oracle) are means over the windows. Returns the JSON
    the CLI writes (less the run's paths and device).
    """
    import numpy as np

    from subquad.train.data import load_split

    for name, value in (("length", length), ("windows", windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    check_max_queries(max_queries)
    _attention_modules(model)  # a dense or foreign model fails before the corpus is read
    if not Path(corpus).is_dir():
        raise ValueError(f"corpus={str(corpus)!r}: not a directory; build one with build_corpus")
    ids = load_split(corpus, "heldout")
    if len(ids) < length:
        raise ValueError(
            f"length={length}: the held-out split of {str(corpus)!r} holds only {len(ids)} tokens; "
            "use a shorter --length or a corpus with more held-out text (a larger heldout_fraction)"
        )
    starts = window_starts(len(ids), length, windows)
    runs = []
    for number, start in enumerate(starts, 1):
        began = time.perf_counter()
        window = torch.from_numpy(np.asarray(ids[start : start + length], dtype=np.int64))[None]
        result = model_attention_recall(model, window, layers=layers, max_queries=max_queries)
        result["start"] = start
        result["seconds"] = time.perf_counter() - began
        runs.append(result)
        if progress:
            print(
                f"window {number}/{len(starts)} (tokens {start}..{start + length}): mean recall "
                f"{result['mean']:.4f}, oracle {result['oracle_recall']:.4f} ({result['seconds']:.1f} s)",
                file=sys.stderr,
            )

    def window_mean(i: int, key: str) -> list[float]:
        """Layer row ``i``'s per-head list ``key`` averaged over the windows."""
        heads = len(runs[0]["layers"][i][key])
        return [sum(run["layers"][i][key][h] for run in runs) / len(runs) for h in range(heads)]

    layer_rows = []
    for i, row in enumerate(runs[0]["layers"]):
        per_head = window_mean(i, "per_head")
        oracle_per_head = window_mean(i, "oracle_per_head")
        layer_rows.append(
            {
                "layer": row["layer"],
                "recall": sum(per_head) / len(per_head),
                "per_head": per_head,
                "oracle_recall": sum(oracle_per_head) / len(oracle_per_head),
                "oracle_per_head": oracle_per_head,
                **{name: _mean_stat([run["layers"][i][name] for run in runs]) for name in _OPERATOR_STATS},
            }
        )
    return {
        "length": length,
        "windows": windows,
        "window_starts": starts,
        "split": "heldout",
        "max_queries": max_queries,
        "queries_per_window": runs[0]["queries"],
        "position_scheme": runs[0]["position_scheme"],
        "ssa": runs[0]["ssa"],
        "layers": layer_rows,
        "mean": sum(row["recall"] for row in layer_rows) / len(layer_rows),
        "oracle_recall": sum(row["oracle_recall"] for row in layer_rows) / len(layer_rows),
        **{name: _mean_stat([row[name] for row in layer_rows]) for name in _OPERATOR_STATS},
        "per_window": [
            {
                "start": run["start"],
                "mean": run["mean"],
                "oracle_recall": run["oracle_recall"],
                "seconds": run["seconds"],
            }
            for run in runs
        ],
    }


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}" if whole > 0 else "n/a"


def recall_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per layer (recall, oracle recall, their ratio, keys attended, tile
    overhead, index agreement), the mean last."""
    index = (result.get("ssa") or {}).get("index", "flat")
    rows = [
        "| layer | recall | oracle recall | recall / oracle | keys attended | tile overhead "
        f"| flat picks the {'tree' if index == 'flat' else index} also picks |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["layers"]:
        rows.append(
            f"| {row['layer']} | {row['recall']:.4f} | {row['oracle_recall']:.4f} "
            f"| {_ratio(row['recall'], row['oracle_recall'])} | {100 * row['keys_attended']:.2f}% "
            f"| {row['tile_overhead']:.2f} | {_stat_cell(row['index_agreement'], 3)} |"
        )
    rows.append(
        f"| **mean** | **{result['mean']:.4f}** | **{result['oracle_recall']:.4f}** "
        f"| **{_ratio(result['mean'], result['oracle_recall'])}** | **{100 * result['keys_attended']:.2f}%** "
        f"| **{result['tile_overhead']:.2f}** | **{_stat_cell(result['index_agreement'], 3)}** |"
    )
    return "\n".join(rows)


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices, e.g. 0,3,7") from None


def main(argv: list[str] | None = None) -> int:
    from subquad.benchmark import parse_length

    parser = argparse.ArgumentParser(
        prog="python -m subquad.eval.recall",
        description="Attention recall of an SSA model's own selections on held-out corpus text, and "
        "the oracle recall: the dense mass the best selection of the same budget (the forced sink and "
        "local blocks plus, per token and KV head, the top_k other blocks holding the most mass) "
        "captures, an upper bound for any router at that budget.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="saved Subquad model directory")
    parser.add_argument("--corpus", required=True, metavar="DIR", help="corpus built with build_corpus")
    parser.add_argument(
        "--length", default="32k", help="tokens per window; k = 1024, m = 1024^2 (default 32k)"
    )
    parser.add_argument("--windows", type=int, default=4, help="evenly spaced windows (default 4)")
    parser.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    parser.add_argument("--dtype", default="auto", choices=runner.DTYPES, help="weights dtype (default auto)")
    parser.add_argument(
        "--max-queries", type=int, default=None, metavar="N",
        help="evaluate N evenly spaced query positions per window (default: all; O(T^2) per layer)",
    )  # fmt: skip
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument(
        "--ssa", default=None,
        help="SSA settings replacing the model's, e.g. summary=mean or top_k=32 (or JSON); the JSON's "
        "ssa field records the settings measured",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no per-window lines on stderr")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        length = parse_length(args.length)
        layers = _parse_layers(args.layers)
        ssa = key_values(args.ssa) if args.ssa else None
        model = _load_model(args.model, args.device, args.dtype, ssa)
        result = evaluate_corpus(
            model,
            args.corpus,
            length,
            windows=args.windows,
            max_queries=args.max_queries,
            layers=layers,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as error:  # a bad --ssa JSON is a ValueError too
        print(f"subquad recall: error: {error}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    result = {
        "model": str(args.model),
        "corpus": str(args.corpus),
        **result,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - began,
    }
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    title = (
        f"attention recall: {args.model}, {result['windows']} x {result['length']} tokens "
        f"({result['position_scheme']}, {result['queries_per_window']} queries per window)"
    )
    print(title)
    print(recall_table(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
