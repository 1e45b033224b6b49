"""SSACache: a transformers ``Cache`` that keeps SSA block summaries up to date as tokens arrive.

Each layer stores keys and values in ``[B, capacity, Hkv, D]`` buffers (the layout SSA reads, so a
million-token cache is never transposed or copied per step) that grow geometrically, plus the float32
mean key of every block (``block_summaries``; with ``summary="max"`` every sub-block, and "block" below
means the summary's ``SSAConfig.summary_size`` keys). Appending ``n`` tokens re-sums only the blocks they
touch, from the stored keys: ``O(n + block_size)`` work per append, so a decode step costs the same at
32K and at 12M tokens, and the summaries equal ``block_summaries(keys)`` at every length.

A model with a learned router (``SubquadConfig.router="learned"``) appends its routing keys too
(``append(k, v, route_keys=...)``); the layer then stores them beside the keys and summarises those
instead, since routing scores against them.

Rows may hold different numbers of tokens (``append(..., valid=mask)`` stores only a row's real
tokens, right-padded): a left-padded batch of prompts becomes rows of different lengths whose
blocks start at each row's first real token, exactly as if each prompt ran alone.

Two ways in:

* transformers models (``attn_implementation="ssa"``) call ``update(key_states, value_states,
  layer_idx)`` with ``[B, H, T, D]`` tensors and get ``[B, H, S, D]`` views back; the views carry the
  layer (``_subquad_cache_layer``) so the ``"ssa"`` attention function reuses its summaries.
* Subquad models call ``append`` / ``keys`` / ``values`` / ``summaries`` / ``seqlens`` directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from subquad.ops.ssa.config import SSAConfig

# transformers renamed the models' cache argument and output field from `past_key_values` (5.17) to
# `cache` (5.24; the old name deprecated). Subquad models take either; calls into other models and the
# outputs we build use the installed version's name.
CACHE_KWARG = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)

# Capacity grows by this factor when full: amortised O(1) appends, at most 25% slack.
_GROWTH = 1.25


def _ssa_config_of(config: Any) -> SSAConfig:
    """SSAConfig from an SSAConfig, a dict, or a transformers config with an ``ssa`` field."""
    if config is None or isinstance(config, (SSAConfig, dict)):
        return SSAConfig.from_dict(config)
    ssa = getattr(config, "ssa", None)
    if ssa is None:
        from subquad import hf

        return hf.default_ssa_config()
    return SSAConfig.from_dict(ssa)


class SSACacheLayer(DynamicLayer):
    """One layer of :class:`SSACache` (keys, values, block summaries, per-row lengths)."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self, block_size: int = 64, reserve: int = 0, shared: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.reserve = reserve
        # State the layers of one cache share, all holding the same lengths (a transformers model's
        # decode-step routing plan, built by its first layer): a function of the lengths, so appends,
        # crops and row selection never make it wrong, only unused.
        self.shared: dict[str, Any] = {} if shared is None else shared
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        self._route_buf: torch.Tensor | None = None  # routing keys, only for a learned router
        self._route_dim: int | None = None
        self._means: torch.Tensor | None = None
        self._block_counts: torch.Tensor | None = None
        self._lengths: list[int] = []
        # Device copy of ``_lengths``, built on demand (``seqlens``); None while every row holds the same
        # length and no one has asked since the last append (decode steps then cost no update per layer).
        self._lengths_dev: torch.Tensor | None = None
        # State that readers derive from complete blocks or the lengths and keep across steps (the tree
        # router's group bounds; in layer 0, a decode step's routing plan): appends never change a
        # complete block, everything else that rewrites stored tokens (crop, row selection, reset)
        # clears it.
        self.derived: dict[str, Any] = {}

    # --- state -----------------------------------------------------------------------------------
    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, route_keys: torch.Tensor | None = None
    ) -> None:
        """Allocate for ``[B, T, Hkv, D]`` keys and ``[B, T, Hkv, Dv]`` values (BTHD layout), and for
        routing keys ``[B, T, Hkv, Dr]`` when given."""
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, _, heads, dim = key_states.shape
        self._route_dim = None if route_keys is None else route_keys.shape[-1]
        self._allocate(batch, heads, dim, value_states.shape[-1], max(self.reserve, self.block_size))
        self._lengths = [0] * batch
        self._lengths_dev = None
        # Keys a block may hold (1 .. block_size): the divisors of a one-block summary refresh.
        self._block_counts = torch.arange(1, self.block_size + 1, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def _allocate(self, batch: int, heads: int, dim: int, dim_v: int, capacity: int) -> None:
        bs = self.block_size
        capacity = -(-capacity // bs) * bs
        keys = torch.zeros(batch, capacity, heads, dim, dtype=self.dtype, device=self.device)
        values = torch.zeros(batch, capacity, heads, dim_v, dtype=self.dtype, device=self.device)
        routes = None
        if self._route_dim is not None:
            routes = torch.zeros(
                batch, capacity, heads, self._route_dim, dtype=self.dtype, device=self.device
            )
        summary_dim = dim if routes is None else self._route_dim
        means = torch.zeros(
            batch, capacity // bs, heads, summary_dim, dtype=torch.float32, device=keys.device
        )
        if self._key_buf is not None:
            used = self._key_buf.shape[1]
            keys[:, :used] = self._key_buf
            values[:, :used] = self._value_buf
            if routes is not None:
                routes[:, :used] = self._route_buf
            means[:, : self._means.shape[1]] = self._means
        self._key_buf, self._value_buf, self._route_buf, self._means = keys, values, routes, means
        # Base-class hooks (offload, prefetch) look at these names.
        self.keys, self.values = keys, values

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self._key_buf.shape[1]
        if needed > capacity:
            batch, _, heads, dim = self._key_buf.shape
            self._allocate(batch, heads, dim, self._value_buf.shape[-1], max(needed, int(capacity * _GROWTH)))

    @property
    def seqlens(self) -> torch.Tensor:
        """Tokens held per row, ``[B]`` int32 on the cache device."""
        if self._lengths_dev is None:
            # Only ever None with all rows of one length: a fill, no host-to-device copy.
            batch, length = len(self._lengths), self._lengths[0] if self._lengths else 0
            self._lengths_dev = torch.full((batch,), length, dtype=torch.int32, device=self.device)
        return self._lengths_dev

    @property
    def lengths(self) -> list[int]:
        """Tokens held per row, as Python ints."""
        return list(self._lengths)

    @property
    def max_length(self) -> int:
        return max(self._lengths, default=0)

    def keys_bshd(self) -> torch.Tensor:
        """``[B, max_len, Hkv, D]`` view of the stored keys (rows shorter than max_len are right-padded)."""
        return self._key_buf[:, : self.max_length]

    def values_bshd(self) -> torch.Tensor:
        return self._value_buf[:, : self.max_length]

    def route_keys_bshd(self) -> torch.Tensor:
        """``[B, max_len, Hkv, Dr]`` view of the stored routing keys (a learned router's layers only)."""
        if self._route_buf is None:
            raise ValueError("route_keys_bshd: this cache layer stores no routing keys")
        return self._route_buf[:, : self.max_length]

    def summaries(self) -> torch.Tensor:
        """``[B, ceil(max_len / block_size), Hkv, D]`` float32 block means (``block_summaries``) of the
        keys, or of the routing keys when the layer stores them."""
        return self._means[:, : -(-self.max_length // self.block_size)]

    @property
    def _summarised(self) -> torch.Tensor:
        """The buffer the summaries average: routing keys when stored, else keys."""
        return self._key_buf if self._route_buf is None else self._route_buf

    # --- appending -------------------------------------------------------------------------------
    def append(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor | None = None,
        route_keys: torch.Tensor | None = None,
    ) -> None:
        """Append ``[B, T, Hkv, D]`` keys and ``[B, T, Hkv, Dv]`` values (and ``[B, T, Hkv, Dr]``
        routing keys: every append of a layer, or none).

        ``valid``: optional ``[B, T]`` bool; row ``b`` stores only its valid tokens, in order, after
        the ones it holds (padding never enters the cache).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, route_keys)
        if (route_keys is None) != (self._route_buf is None):
            raise ValueError(
                f"route_keys: got {'None' if route_keys is None else 'a tensor'}, but this cache layer "
                f"{'stores' if self._route_buf is not None else 'does not store'} routing keys: pass them "
                "with every append of a layer or never"
            )
        batch, steps = key_states.shape[:2]
        if batch != len(self._lengths):
            raise ValueError(f"key_states: batch {batch}, but the cache holds {len(self._lengths)} rows")
        if valid is None and len(set(self._lengths)) <= 1:
            start = self._lengths[0] if self._lengths else 0
            self._ensure_capacity(start + steps)
            self._key_buf[:, start : start + steps] = key_states
            self._value_buf[:, start : start + steps] = value_states
            if route_keys is not None:
                self._route_buf[:, start : start + steps] = route_keys
            self._lengths = [start + steps] * batch
            self._lengths_dev = None
            self._refresh_summaries(slice(None), start, start + steps)
            return
        if valid is None and steps == 1:
            self._append_one_ragged(key_states, value_states, route_keys)
            return
        counts = [steps] * batch if valid is None else valid.sum(1).tolist()
        self._ensure_capacity(max(length + n for length, n in zip(self._lengths, counts)))
        for row in range(batch):
            start, n = self._lengths[row], int(counts[row])
            if n == 0:
                continue
            rows = [key_states[row], value_states[row]]
            if route_keys is not None:
                rows.append(route_keys[row])
            if valid is not None and n != steps:
                rows = [t[valid[row]] for t in rows]
            elif valid is not None:
                rows = [t[:n] for t in rows]
            self._key_buf[row, start : start + n] = rows[0]
            self._value_buf[row, start : start + n] = rows[1]
            if route_keys is not None:
                self._route_buf[row, start : start + n] = rows[2]
            self._lengths[row] = start + n
            self._refresh_summaries(slice(row, row + 1), start, start + n)
        self._lengths_dev = torch.tensor(self._lengths, dtype=torch.int32, device=self.device)

    def _append_one_ragged(
        self, key_states: torch.Tensor, value_states: torch.Tensor, route_keys: torch.Tensor | None
    ) -> None:
        """One token per row, rows of different lengths: vectorised (no host sync), as in decoding."""
        batch = key_states.shape[0]
        bs = self.block_size
        self._ensure_capacity(self.max_length + 1)
        rows = torch.arange(batch, device=self.device)
        pos = self.seqlens.long()
        self._key_buf[rows, pos] = key_states[:, 0]
        self._value_buf[rows, pos] = value_states[:, 0]
        if route_keys is not None:
            self._route_buf[rows, pos] = route_keys[:, 0]
        self._lengths_dev += 1
        self._lengths = [n + 1 for n in self._lengths]
        # Re-sum each row's open block: [B, bs] positions gathered from the buffer.
        block = pos // bs
        idx = block[:, None] * bs + torch.arange(bs, device=self.device)
        inside = idx <= pos[:, None]
        gathered = self._summarised[rows[:, None], idx].float() * inside[..., None, None]
        self._means[rows, block] = gathered.sum(1) / inside.sum(1).view(batch, 1, 1)

    def _refresh_summaries(self, rows: slice, start: int, stop: int) -> None:
        """Recompute the means of blocks holding positions ``[start, stop)`` of ``rows`` from the buffer.

        Positions at or past a row's length always hold zeros (appends write only real tokens, ``crop``
        clears what it drops, new capacity is zeroed), so whole blocks are summed: the same sums as
        ``block_summaries``' zero-padded ones.
        """
        bs = self.block_size
        first, last = start // bs, (stop - 1) // bs
        region = self._summarised[rows, first * bs : (last + 1) * bs].float()
        sums = region.view(region.shape[0], last - first + 1, bs, *region.shape[2:]).sum(2)
        if first == last:
            # One block (every decode step): divide by a slice of the counts table, in place.
            count = self._block_counts[stop - first * bs - 1]
            if sums.requires_grad:  # out= does not record autograd history
                self._means[rows, first : first + 1] = sums / count
            else:
                torch.div(sums, count, out=self._means[rows, first : first + 1])
            return
        counts = torch.full((last - first + 1,), float(bs), device=self.device)
        counts[-1:].fill_(stop - last * bs)  # not ``counts[-1] = n``: a copy from the host, and a sync
        self._means[rows, first : last + 1] = sums / counts.view(1, -1, 1, 1)

    # --- transformers Cache layer API ------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers entry: ``[B, H, T, D]`` in, ``[B, H, S, D]`` views of the whole cache out."""
        if self.is_initialized and len(set(self._lengths)) > 1:
            raise ValueError(
                f"SSACache.update: rows hold different lengths {self._lengths}; transformers models need "
                "equal lengths (left padding stays in the cache). Use one cache per padding scheme."
            )
        self.append(key_states.transpose(1, 2), value_states.transpose(1, 2))
        keys = self.keys_bshd().transpose(1, 2)
        values = self.values_bshd().transpose(1, 2)
        keys._subquad_cache_layer = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.max_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.derived.clear()
        self._key_buf = self._value_buf = self._route_buf = self._means = None
        self._block_counts = None
        self.keys = self.values = None
        self._lengths, self._lengths_dev = [], None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every row (a negative int, as in transformers)."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove={tokens_to_remove}: expected a negative int (tokens to drop)")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.derived.clear()
        new = [max(0, n + tokens_to_remove) for n in self._lengths]
        for row, (old, length) in enumerate(zip(self._lengths, new)):
            self._key_buf[row, length:old] = 0
            self._value_buf[row, length:old] = 0
            if self._route_buf is not None:
                self._route_buf[row, length:old] = 0
            if length:
                self._refresh_summaries(
                    slice(row, row + 1), (length - 1) // self.block_size * self.block_size, length
                )
        self._lengths = new
        self._lengths_dev = torch.tensor(new, dtype=torch.int32, device=self.device)

    def _select_rows(self, index: torch.Tensor) -> None:
        self.derived.clear()
        index = index.to(self.device)
        self._key_buf = self._key_buf.index_select(0, index)
        self._value_buf = self._value_buf.index_select(0, index)
        if self._route_buf is not None:
            self._route_buf = self._route_buf.index_select(0, index)
        self._means = self._means.index_select(0, index)
        self.keys, self.values = self._key_buf, self._value_buf
        self._lengths_dev = self.seqlens.index_select(0, index)
        self._lengths = self._lengths_dev.tolist()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(torch.as_tensor(indices, device=self.device).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(len(self._lengths), device=self.device).repeat_interleave(repeats))

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    # --- memory ----------------------------------------------------------------------------------
    def bytes_per_token(self) -> float:
        """Bytes one token costs in this layer: its key and value (and routing key), plus its share of a
        block summary."""
        if not self.is_initialized:
            return 0.0
        stored = [self._key_buf, self._value_buf] + ([] if self._route_buf is None else [self._route_buf])
        kv = sum(t[0, 0].numel() for t in stored) * self._key_buf.element_size()
        return kv + self._means[0, 0].numel() * self._means.element_size() / self.block_size

    def memory_bytes(self) -> int:
        """Bytes allocated (including spare capacity)."""
        if not self.is_initialized:
            return 0
        stored = (self._key_buf, self._value_buf, self._route_buf, self._means)
        return sum(t.numel() * t.element_size() for t in stored if t is not None)


class SSACache(Cache):
    """KV cache for selective sparse attention (see the module docstring).

    Args:
        config: where the block size comes from: an :class:`SSAConfig`, a dict of its fields, or a
            transformers config with an ``ssa`` dict (Subquad configs; models converted with
            ``attn_implementation="ssa"``); default ``SSAConfig()`` / ``subquad.hf.register(default=...)``.
        num_layers: layers to create up front (default: added as the model first touches them).
        max_length: tokens to reserve per row on first use, so a prompt of known length never regrows
            (a regrow briefly holds two copies of the cache).
    """

    def __init__(
        self, config: Any = None, num_layers: int | None = None, max_length: int | None = None
    ) -> None:
        ssa = _ssa_config_of(config)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0
        ):
            raise ValueError(f"max_length={max_length!r}: expected a non-negative int or None")
        if num_layers is None and config is not None and hasattr(config, "num_hidden_layers"):
            num_layers = config.num_hidden_layers
        self.ssa_config = ssa
        self._reserve = max_length or 0
        self._shared: dict[str, Any] = {}
        if num_layers is None:
            super().__init__(layer_class_to_replicate=self._new_layer)
        else:
            super().__init__(layers=[self._new_layer() for _ in range(num_layers)])

    def _new_layer(self) -> SSACacheLayer:
        # A layer summarises every summary_size keys: the key blocks, or their sub-blocks (summary="max").
        block_size = self.ssa_config.summary_size
        return SSACacheLayer(block_size=block_size, reserve=self._reserve, shared=self._shared)

    def layer(self, layer_idx: int) -> SSACacheLayer:
        """The layer ``layer_idx``, created if the model has not touched it yet."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        return self.layers[layer_idx]

    def reserve(self, max_length: int) -> None:
        """Room for ``max_length`` tokens per row in every layer: allocated layers grow now, the others
        allocate it on first use, so appends up to that length never reallocate (or copy) a buffer."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
            raise ValueError(f"max_length={max_length!r}: expected a non-negative int")
        self._reserve = max(self._reserve, max_length)
        for layer in self.layers:
            layer.reserve = max(layer.reserve, max_length)
            if layer.is_initialized:
                layer._ensure_capacity(max_length)

    def seqlens(self, layer_idx: int = 0) -> torch.Tensor | None:
        """Tokens held per row (``[B]`` int32), or None before the first append."""
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            return None
        return self.layers[layer_idx].seqlens

    def bytes_per_token(self) -> float:
        """Cache bytes per token over all layers (keys, values, summaries; spare capacity excluded)."""
        return float(sum(layer.bytes_per_token() for layer in self.layers))

    def memory_bytes(self) -> int:
        """Bytes allocated by all layers, spare capacity included."""
        return sum(layer.memory_bytes() for layer in self.layers)
