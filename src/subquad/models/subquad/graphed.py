"""CUDA-graph decode step for Subquad models: a generated token costs one graph replay.

An eager decode step of the ``small`` model launches ~650 kernels (norms, projections, rotary, cache
appends, routing, attention, MLPs) and is bound by those launches, not by the GPU (12.3 ms at 1M
tokens, while its SSA attention, graphed, takes ~0.03 ms a layer). :class:`GraphedDecoder` records the
step in a CUDA graph once and replays it for each token.

A graph bakes in every Python number, shape and pointer of the step it recorded, so the step here reads
and writes buffers that stay put:

* What changes every token lives on the device: the new tokens (``_ids``), their position (``_pos``:
  the row of the rotary tables, the cache slot the key and value go to, the block summary re-summed)
  and the rows' lengths the routing reads (the plan's ``seqlens``); the graph ends by advancing them.
  The rotary tables hold the positions of the new token's key block: the host recomputes them, with
  the model's own ops, when a token enters a new block (``_set_rotary_tables``).
* What changes once per key block is set by the host when a token enters the block (``_set_plan``):
  the routing plan's sink and local slots, written into a buffer the graph reads (``_fixed``), and the
  tree router's kept group bounds, brought up to the block with PyTorch ops outside the graph. The
  fused tree step (CUDA, ``index="tree"``) takes nothing else from the block: its routing kernel derives
  the window from ``_pos`` and its attention reads the whole cache buffers, bounded by ``seqlens``
  (``triton_decode.fused_step_layout``). Its graph is re-captured only when that layout changes (the
  tree's group size or its stretches' padded length: 19 times from 1K to 12M tokens with the default
  settings, against 196,592 key blocks). The other SSA steps (the flat router, whose launch depends on
  the block count; the PyTorch path) are re-captured when the new token opens a key block. Every kind
  is also re-captured when a buffer it reads is reallocated (the cache's growth, the kept bounds') or
  the cache changed under the decoder (``crop``, row selection). The first such step runs eagerly
  first, the same ops: its result is the step's, and it compiles and warms up what the capture needs;
  later ones capture and replay at once (``_prepare_and_run``).
* The dense twin (``attention="dense"``) reads every key it holds, and SDPA's flash path (the one that
  splits a long key range across the GPU for a single query) takes no key-length mask: a fixed-length
  read masked by the lengths would fall to another backend. So its step is captured in pieces, one
  graph per stretch between attention calls, and each layer's SDPA call runs eagerly between two
  replays over the keys held (13 replays and 12 SDPA calls a token for ``small``). Nothing else depends
  on the length, so those graphs are re-captured only when a buffer is reallocated.

After a step the cache's host state is what the eager step leaves: each layer's lengths (device lengths
unset: rows of one length), the summaries (written on the device), the tree router's kept bounds and the
shared routing plan, so eager calls, ``generate()`` and ``crop`` keep working on the cache.
``capture=False`` runs the same ops eagerly, on any device (CPU tests, debugging).
"""

from __future__ import annotations

import operator
import time
import weakref
from contextlib import nullcontext, suppress
from dataclasses import replace

import torch
from torch.nn.attention import sdpa_kernel

from subquad.cache import SSACache, SSACacheLayer
from subquad.models.prefill import prefill
from subquad.models.subquad import modeling
from subquad.models.subquad.modeling import SubquadForCausalLM
from subquad.ops import cuda_graph, fused
from subquad.ops.ssa.interface import resolve_backend
from subquad.ops.ssa.triton_decode import (
    DecodePlan,
    TreeBounds,
    decode_plan,
    fused_step_layout,
    tree_step_bounds,
)

# generate() with end-of-sequence tokens asks whether every row has stopped this often: each question
# is a host sync, and between them the host runs ahead of the GPU (which also hides re-captures).
_EOS_CHECK_EVERY = 16
_VERSION = operator.attrgetter("_version")
_GRAPH_DTYPES = (torch.float16, torch.bfloat16)


class GraphedDecoder:
    """Decode steps of a Subquad model over ``cache``, each one CUDA-graph replay (module docstring).

    Args:
        model: a :class:`SubquadForCausalLM` with ``attention="ssa"`` and ``position_scheme="rope"`` (the
            decode-kernel path; flat or tree index, not beam), or a dense twin (``attention="dense"``).
        cache: the :class:`subquad.SSACache` to decode into (default: a new one). Its rows must hold one
            length (no padding).
        capture: record CUDA graphs (the model on CUDA, float16 or bfloat16). False runs the ops the
            graphs would hold eagerly, on any device.

    ``step(input_ids [B, 1])`` returns the ``[B, vocab]`` logits ``model(input_ids, past_key_values=cache,
    use_cache=True, logits_to_keep=1).logits[:, -1]`` would; the tensor is overwritten by the next step
    (clone it to keep it). Until the cache holds a token, a step runs the model's own forward (which
    creates the cache's buffers). ``generate`` decodes greedily. ``captures`` counts the captures and
    ``capture_seconds`` is the host time of the last one (recording and instantiation). The model's
    weights are read in place, or for the q/k/v and gate/up projections from concatenated copies that
    each step refreshes if a weight changed: update them in place, never replace them, while a decoder
    holds graphs.
    """

    def __init__(
        self, model: SubquadForCausalLM, cache: SSACache | None = None, capture: bool = True
    ) -> None:
        if not isinstance(model, SubquadForCausalLM):
            raise TypeError(f"model: got {type(model).__name__}, expected a SubquadForCausalLM")
        config = model.config
        if config.router != "shared":
            raise ValueError(
                f"router={config.router!r}: the graphed step supports router='shared' only (a learned "
                "router routes on the PyTorch path, outside the decode kernels)"
            )
        if config.attention == "ssa" and config.ssa_config.index == "beam":
            raise ValueError(
                "ssa.index='beam': the graphed step supports 'flat' and 'tree' (the beam index routes each "
                "step on the host's view of the context length, which a replayed graph cannot follow)"
            )
        if config.attention == "ssa" and config.ssa_config.summary != "mean":
            raise ValueError(
                f"ssa.summary={config.ssa_config.summary!r}: the graphed step supports 'mean' only (its "
                "device-side cache update re-sums one block summary per token)"
            )
        if config.position_scheme != "rope":
            raise ValueError(
                f"position_scheme={config.position_scheme!r}: the graphed step needs 'rope' (the decode "
                "kernels' path, keys rotated as they enter the cache); 'local_rope' decodes on the PyTorch "
                "path"
            )
        if cache is None:
            cache = SSACache(config)
        elif not isinstance(cache, SSACache):
            raise TypeError(f"cache: got {type(cache).__name__}, expected a subquad.SSACache (or None)")
        elif cache.ssa_config.block_size != config.ssa_config.block_size:
            raise ValueError(
                f"cache: block_size={cache.ssa_config.block_size}, expected {config.ssa_config.block_size} "
                "(the model's ssa.block_size)"
            )
        weight = model.lm_head.weight
        if capture and weight.device.type != "cuda":
            raise ValueError(
                f"capture=True: the model is on {weight.device}, CUDA graphs need CUDA (capture=False runs "
                "the same step eagerly)"
            )
        if capture and weight.dtype not in _GRAPH_DTYPES:
            raise ValueError(
                f"capture=True: the model is in {weight.dtype}, expected float16 or bfloat16 (the decode "
                "kernels' dtypes; others route on the PyTorch path, which is not checked under capture)"
            )
        self.model, self.cache, self.capture = model, cache, bool(capture)
        self.device, self.dtype = weight.device, weight.dtype
        self.captures = 0
        self.capture_seconds = 0.0
        self._dense = config.attention == "dense"
        self._weights = _ProjectionWeights(model)
        self._ssa = config.ssa_config
        self._block_size = self._ssa.block_size
        head = weight.new_empty(1, config.head_dim)  # the attention kernels' backend, as the layers pick it
        self._backend = resolve_backend("auto", head, head)
        self._num_layers = config.num_hidden_layers
        self._stream = torch.cuda.Stream(self.device) if self.capture else None
        # Static inputs of the step (allocated per batch size) and what the step was prepared for.
        self._batch: int | None = None
        self._held: int | None = None  # tokens per row that _pos encodes
        self._prepared: tuple | None = None  # (key, capacity, weak references): see _preparation
        self._plan: DecodePlan | None = None  # of the key block _set_plan last saw (None: build again)
        self._captured_batch: int | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [block_size, D] float32
        self._rope_block: int | None = None  # the key block they hold
        self._pieces: list[tuple[cuda_graph.DriverGraph | torch.cuda.CUDAGraph, tuple | None]] = []
        self._logits: torch.Tensor | None = None

    # --- public ----------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one new token per row, ``input_ids [B, 1]``, appended to the cache."""
        layers = self._cache_layers()
        if layers is None:
            with torch.no_grad():
                ids = input_ids.to(self.device)
                out = self.model(ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]
        held = self._held_length(layers, input_ids)
        batch = len(layers[0]._lengths)
        if batch != self._batch:
            self._allocate_inputs(batch)
        if held != self._held:  # a new batch, or the cache moved under the decoder (eager steps, crop)
            self._set_position(held)
        self._weights.refresh()
        self._set_rotary_tables(held)
        with torch.no_grad(), self._sdpa_context():
            new_block = self._plan is None or self._plan.num_blocks != held // self._block_size + 1
            if not self._dense and new_block:
                self._set_plan(layers, held)
            prepare = not self._is_prepared(layers, held)
            captured = False
            if prepare:
                logits, captured = self._prepare_and_run(layers, held, input_ids)
            else:
                self._ids.copy_(input_ids)
                logits = self._replay(held + 1) if self._pieces else self._run(held + 1)
            for layer in layers:
                # What SSACacheLayer.append leaves for rows of one length.
                layer._lengths = [held + 1] * self._batch
                layer._lengths_dev = None
            self._held = held + 1
            if prepare:
                # After the bookkeeping, so the cache stays consistent if capturing fails; after the eager
                # run, which creates the tree router's kept bounds when they are missing.
                if self.capture and not captured:
                    self._capture()
                key, objects = self._preparation(layers, held)
                capacity = min(layer._key_buf.shape[1] for layer in layers)
                self._prepared = key, capacity, [weakref.ref(obj) for obj in objects]
        return logits

    def invalidate(self) -> None:
        """Forget what the step was prepared for: the next step runs eagerly and captures again."""
        self._prepared = self._held = self._plan = None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding, as ``model.generate(input_ids, max_new_tokens=n, do_sample=False)``.

        ``input_ids [B, T]`` is prefilled into the cache chunk by chunk (:func:`subquad.models.prefill`,
        after what the cache holds; ``chunk_size`` default ``config.prefill_chunk_tokens``), then every
        new token after the first is one :meth:`step`. Returns ``[B, T + n]``: the prompt, then the new
        tokens. ``eos_token_id`` (default: the model's ``generation_config``; ``[]`` for none): a row
        stops at it and continues with ``pad_token_id``; decoding ends once every row has stopped,
        checked every 16 tokens, with the output and the cache trimmed as if it had ended at once.
        ``attention_mask`` may only mark every token real (rows of one length).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: got {got}, expected [batch, length >= 1]")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "attention_mask: padded rows are not supported by the graphed step (rows of different "
                "lengths); use model.generate for a padded batch"
            )
        eos, pad = self._stop_tokens(eos_token_id, pad_token_id)
        input_ids = input_ids.to(self.device)
        # Room for the whole sequence up front, so no buffer grows (and no step re-captures) for it.
        for i in range(self._num_layers):
            self.cache.layer(i)
        self.cache.reserve(self.cache.get_seq_length() + input_ids.shape[1] + max_new_tokens)
        first = prefill(self.model, input_ids, chunk_size=chunk_size, cache=self.cache, logits_to_keep=1)
        token = first.logits[:, -1].argmax(-1)
        finished = None if eos is None else torch.isin(token, eos)
        tokens = [token]
        for i in range(1, max_new_tokens):
            if finished is not None and i % _EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
            token = self.step(token[:, None]).argmax(-1)
            if finished is not None:
                # As transformers' greedy search: finished rows continue with padding.
                token = torch.where(finished, pad, token)
                finished = finished | torch.isin(token, eos)
            tokens.append(token)
        new = torch.stack(tokens, dim=1)
        if finished is not None:
            # The first token after which every row had stopped: drop what follows, and the cache's copies
            # of the tokens fed after it (the last token kept is never fed, as in model.generate).
            done = (torch.isin(new, eos).cumsum(1) > 0).all(0).nonzero()
            if done.numel():
                last = int(done[0])
                if new.shape[1] - 1 > last:
                    self.cache.crop(-(new.shape[1] - 1 - last))
                new = new[:, : last + 1]
        return torch.cat([input_ids, new], dim=1)

    # --- host side -------------------------------------------------------------------------------
    def _cache_layers(self) -> list[SSACacheLayer] | None:
        """The cache's layers, or None while it holds nothing (a step then runs the model's forward)."""
        layers = self.cache.layers[: self._num_layers]
        initialized = sum(layer.is_initialized for layer in layers)
        if initialized == 0:
            return None
        if initialized != self._num_layers:
            raise ValueError(
                f"cache: {initialized} of {self._num_layers} layers hold tokens, expected all (a cache "
                "filled by this model)"
            )
        return layers

    def _held_length(self, layers: list[SSACacheLayer], input_ids: torch.Tensor) -> int:
        """Tokens every row and layer holds, after checking the step can run on them."""
        lengths = layers[0]._lengths
        held = lengths[0]
        if lengths.count(held) != len(lengths) or any(layer._lengths != lengths for layer in layers[1:]):
            raise ValueError(
                f"cache: rows hold {lengths} tokens (layer 0); the graphed step needs every row and layer "
                "at one length (rows of different lengths decode eagerly: model(ids, past_key_values=cache))"
            )
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (len(lengths), 1):
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(
                f"input_ids: got {got}, expected [{len(lengths)}, 1] (one new token per cached row)"
            )
        return held

    def _preparation(self, layers: list[SSACacheLayer], held: int) -> tuple[tuple, list]:
        """What a prepared (captured) step depends on: ``(key, objects)``. The key, compared by value: what
        the step's launches bake in, and the batch. For the fused tree step that is its layout
        (``fused_step_layout``: the tree's group size and stretches), which lasts many key blocks; for
        the other SSA steps the new token's key block (the routing plan, the flat router's launch); for
        the dense twin nothing. The objects, compared by identity: every cache object whose memory the
        step reads or writes (a reallocated buffer, or state cleared by ``crop``, means preparing again)."""
        objects = []
        for layer in layers:
            bounds = layer.derived.get("tree_bounds")
            objects += [layer, layer._key_buf, layer._value_buf, layer._means]
            objects += [_MISSING] * 3 if bounds is None else [bounds, bounds.hi, bounds.lo]
        launch = None
        if not self._dense:
            layout = fused_step_layout(self._plan, self._ssa, self._backend)
            launch = layout if layout is not None else held // self._block_size
        return (launch, len(layers[0]._lengths)), objects

    def _is_prepared(self, layers: list[SSACacheLayer], held: int) -> bool:
        if self._prepared is None:
            return False
        kept_key, capacity, refs = self._prepared
        key, objects = self._preparation(layers, held)
        return (
            key == kept_key
            and held < capacity  # the new token's slot exists (else the buffers grow first)
            and _all_same(refs, objects)
        )

    def _prepare_and_run(
        self, layers: list[SSACacheLayer], held: int, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """A step the decoder is not prepared for (a new launch layout or key block, changed cache
        objects): set the static inputs, make room and run the step: ``(logits, captured)``.

        The first time, and for the dense twin, the step runs eagerly (``step`` then captures it for the
        steps that follow: the eager run compiled and warmed up what the capture records). A later SSA
        re-capture skips that eager run, which cost as much host time as the capture (~8 ms for
        ``small``): it captures, then replays. If that capture fails (a kernel that still had to
        compile, say), the step runs eagerly and captures as the first time."""
        # Weak references only: a buffer the cache replaced must be freed (a long cache is most of the GPU).
        self._prepared = None
        warm = self.capture and not self._dense and bool(self._pieces) and self._captured_batch == self._batch
        self._ids.copy_(input_ids)
        for layer in layers:
            layer._ensure_capacity(held + 1)
        if not self._dense and layers[0].derived.get("decode_plan") is not self._plan:
            self._set_plan(layers, held)  # a crop cleared the cache's plan and kept bounds
        if warm:
            try:
                self._capture(capture_error_mode="relaxed")  # relaxed: a Triton module may still load
            except RuntimeError:
                pass  # a capture runs nothing: the eager step below starts from the same state
            else:
                return self._replay(held + 1), True
        return self._run(held + 1), False

    def _set_plan(self, layers: list[SSACacheLayer], held: int) -> None:
        """The routing plan of the key block the token at position ``held`` lands in (sink and local slots,
        the tree's layout), and each layer's kept tree-router bounds brought up to that block.

        Run when the token enters a block (and when preparing), before deciding whether to prepare: a
        fused tree step replays one graph across blocks, reading the slots from ``_fixed`` (rewritten
        here) and the bounds from the buffers updated here. The bounds' update (PyTorch ops over groups
        that became probe-able) thus stays out of the graphs; when it reallocates them, the step prepares
        again. The cache's buffers are grown first, so the bounds see every complete block."""
        batch = self._batch
        for layer in layers:
            layer._ensure_capacity(held + 1)
        blocks = held // self._block_size + 1
        plan = decode_plan(self._seqlens, blocks, self._ssa, [held + 1] * batch)
        self._fixed.copy_(plan.fixed)
        self._plan = replace(plan, fixed=self._fixed)
        # As the eager step: layer 0 keeps the step's plan for the next one.
        layers[0].derived["decode_plan"] = self._plan
        if self._ssa.index == "tree" and self._plan.tree is not None:
            for layer in layers:
                kept = layer.derived.setdefault("tree_bounds", TreeBounds())
                tree_step_bounds(layer._means[:, :blocks], self._plan.tree, self._ssa, kept)

    def _allocate_inputs(self, batch: int) -> None:
        config = self.model.config
        device = self.device
        self._batch = batch
        self._held = self._plan = None  # the plan holds the old batch's lengths
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)  # rows of one length: one position
        self._seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._residual = torch.zeros(batch, config.hidden_size, dtype=self.dtype, device=device)
        fixed = self._ssa.sink_blocks + self._ssa.local_blocks
        self._fixed = torch.zeros(batch, 1, fixed, dtype=torch.int32, device=device)  # the plan's slots
        self._attention_out = None
        if self._dense:
            heads, dim = config.num_attention_heads, config.head_dim
            self._attention_out = torch.zeros(batch, 1, heads, dim, dtype=self.dtype, device=device)

    def _set_position(self, held: int) -> None:
        self._pos.fill_(held)
        self._seqlens.fill_(held + 1)

    def _set_rotary_tables(self, held: int) -> None:
        """The rotary tables ``(cos, sin)`` of the key block the token at position ``held`` lands in, one
        row per position (the step reads row ``pos % block_size``): computed by the model's own ops, so
        the rotation is the eager step's to the bit, into buffers that stay put (graphs read them)."""
        block = held // self._block_size
        if block == self._rope_block:
            return
        first = block * self._block_size
        positions = torch.arange(first, first + self._block_size, device=self.device)
        tables = self.model.model.layers[0].self_attn.rotary.tables(positions)
        if self._rope is None:
            self._rope = tuple(table.contiguous() for table in tables)
        else:
            for buffer, table in zip(self._rope, tables):
                buffer.copy_(table)
        self._rope_block = block

    def _sdpa_context(self):
        # The dense step's SDPA backends, as SubquadModel.forward chooses them for a decode step on CUDA.
        backends = modeling.DENSE_DECODE_BACKENDS
        if self._dense and self.device.type == "cuda" and backends is not None:
            return sdpa_kernel(backends)
        return nullcontext()

    # --- the step ----------------------------------------------------------------------------------
    def _forward(self):
        """The step, from the static inputs to the logits ``[B, vocab]``: exactly the ops the graphs hold.

        A generator: a dense twin's attention is handed out as ``(layer index, q)`` and its output sent
        back (it runs between graphs, see the module docstring); SSA attends inline.
        """
        core = self.model.model
        batch, pos = self._batch, self._pos
        heads_q, heads_kv = core.layers[0].self_attn.num_heads, core.layers[0].self_attn.num_kv_heads
        residual = self._residual  # [B, C]: updated in place by the matmuls after attention and MLP
        for i, (layer, cache_layer) in enumerate(zip(core.layers, self.cache.layers)):
            attn, norm, post_norm = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
            qkv_w = self._weights.qkv[i]
            if i == 0:  # the embedding lookup inside the first product (it writes the residual too)
                ids, table = self._ids.view(batch), core.embed_tokens.weight
                qkv = fused.embed_norm_linear(ids, table, residual, norm.weight, norm.eps, qkv_w)
            else:
                qkv = fused.norm_linear(residual, norm.weight, norm.eps, qkv_w)
            qkv = qkv.view(batch, 1, heads_q + 2 * heads_kv, attn.head_dim)
            if self._dense:
                buffers = cache_layer._key_buf, cache_layer._value_buf, cache_layer._means
                out = yield i, fused.rotate_append_decode_token(qkv, *self._rope, pos, *buffers)
            else:
                out = attn._decode_from_projection(qkv, self._rope, pos, self._plan, cache_layer)
            fused.linear_add_(residual, out.reshape(batch, -1), attn.o_proj.weight)
            gate_up = fused.norm_linear(residual, post_norm.weight, post_norm.eps, self._weights.gate_up[i])
            fused.swiglu_linear_add_(residual, gate_up, layer.mlp.down_proj.weight)
        # The final norm and lm_head as one GEMV (cuBLAS took ~15 us for `small`'s 49 MB head). The same
        # kernel advances the position and lengths for the next step, after this step's last read of them.
        head, counters = self.model.lm_head.weight, (pos, self._seqlens)
        return fused.norm_linear(residual, core.norm.weight, core.norm.eps, head, advance=counters)

    def _attend_dense(self, index: int, q: torch.Tensor, length: int) -> torch.Tensor:
        """A dense twin's attention of layer ``index`` over the ``length`` keys held, into the static
        buffer the next piece reads."""
        layer = self.cache.layers[index]
        scale = self.model.model.layers[index].self_attn.scale
        out = modeling._dense_decode(q, layer._key_buf[:, :length], layer._value_buf[:, :length], scale)
        return self._attention_out.copy_(out)

    def _run(self, length: int) -> torch.Tensor:
        """The step eagerly (``length``: tokens per row after it)."""
        forward, sent = self._forward(), None
        while True:
            try:
                request = forward.send(sent)
            except StopIteration as done:
                return done.value
            sent = self._attend_dense(*request, length)

    def _replay(self, length: int) -> torch.Tensor:
        for graph, request in self._pieces:
            graph.replay()
            if request is not None:
                self._attend_dense(*request, length)
        return self._logits

    def _capture(self, capture_error_mode: str = "global") -> None:
        """Record the step: one graph, or for a dense twin one per stretch between attention calls.

        ``capture_begin`` / ``capture_end`` rather than ``torch.cuda.graph``, which synchronises and
        empties the allocator's cache on entry. The graphs are the driver's (``ops.cuda_graph``: once a
        process has recorded four of torch's, every replay is slower). New graphs share the memory pool of
        the ones they replace, which are kept until then: the pool is never freed, and re-capturing costs
        no allocation.
        """
        start = time.perf_counter()
        pool = self._pieces[0][0].pool() if self._pieces else None
        pieces, forward, sent, logits = [], self._forward(), None, None
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            while logits is None:
                graph = cuda_graph.new_graph()
                graph.capture_begin(pool=pool, capture_error_mode=capture_error_mode)
                try:
                    request = forward.send(sent)
                except StopIteration as done:
                    request, logits = None, done.value
                except BaseException:
                    with suppress(Exception):  # the capture is void; report what broke it
                        graph.capture_end()
                    raise
                graph.capture_end()
                pool = graph.pool()
                pieces.append((graph, request))
                sent = self._attention_out
        current.wait_stream(self._stream)
        self._pieces, self._logits, self._captured_batch = pieces, logits, self._batch
        self.captures += 1
        self.capture_seconds = time.perf_counter() - start

    def _stop_tokens(self, eos_token_id, pad_token_id) -> tuple[torch.Tensor | None, int | None]:
        """generate()'s end-of-sequence ids (a device tensor, None for none) and padding id."""
        generation = self.model.generation_config
        if eos_token_id is None:
            eos_token_id = generation.eos_token_id
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if not ids:
            return None, None
        if pad_token_id is None:
            pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else ids[0]
        return torch.tensor(ids, device=self.device), int(pad_token_id)


class _ProjectionWeights:
    """Each layer's q/k/v and gate/up projection weights concatenated, so the step runs one matmul for
    each group (the MLP's product then reads the two halves of one output). Copies of the model's
    weights: :meth:`refresh` rewrites them in place (so recorded graphs read the new values) whenever a
    source weight was changed in place or replaced since the last copy."""

    def __init__(self, model: SubquadForCausalLM) -> None:
        groups = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups.append((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
            groups.append((mlp.gate_proj.weight, mlp.up_proj.weight))
        with torch.no_grad():
            self._copies = [(group, torch.cat(group)) for group in groups]
        self._sources = [w for group, _ in self._copies for w in group]
        self.qkv = [target for _, target in self._copies[0::2]]
        self.gate_up = [target for _, target in self._copies[1::2]]
        self._stamp = self._stamp_now()

    def _stamp_now(self) -> tuple:
        # Every step asks: C-level loops over the weights' pointers and version counters.
        return tuple(map(torch.Tensor.data_ptr, self._sources)), tuple(map(_VERSION, self._sources))

    def refresh(self) -> None:
        stamp = self._stamp_now()
        if stamp != self._stamp:
            with torch.no_grad():
                for group, target in self._copies:
                    torch.cat(group, out=target)
            self._stamp = stamp


class _Missing:
    """Stands for an object that is not there (no kept tree bounds) in a step's preparation, which holds
    weak references only; one that lives as long as the module, so its reference never dies."""


_MISSING = _Missing()


def _all_same(refs: list[weakref.ref], objects: list) -> bool:
    """Whether each object is the one its weak reference was taken of (every step asks, so C-level loops).
    A dead reference gives None, which matches nothing: a crop drops the kept tree bounds, whose memory
    the captured graph still reads, and the step must then prepare (and capture) again rather than replay
    over freed memory (a missing object is ``_MISSING``, never None)."""
    return len(refs) == len(objects) and all(map(operator.is_, map(weakref.ref.__call__, refs), objects))
