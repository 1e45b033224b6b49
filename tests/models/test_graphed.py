"""GraphedDecoder: the device-driven decode step equals the eager one, leaves the cache as the eager one
does, and replays as CUDA graphs (CUDA tests skip without a GPU)."""

from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import cuda_graph, pdl

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# (attention, index): the two SSA routers and the dense twin.
KINDS = [("ssa", "flat"), ("ssa", "tree"), ("dense", "flat")]
KIND_IDS = ["ssa-flat", "ssa-tree", "dense"]


def make_model(attention="ssa", index="flat", device="cpu", dtype=torch.float32, ssa=None, **over):
    # Block 16 and groups of 2: a few dozen steps cross several blocks, tree groups and buffer growths.
    tree_group = 2 if index == "tree" else None
    ssa = {"block_size": 16, "top_k": 2, "index": index, "tree_group": tree_group, **(ssa or {})}
    cfg = SubquadConfig.from_flavor("debug", position_scheme="rope", attention=attention, ssa=ssa, **over)
    return SubquadForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def prefilled(model, prompt):
    with torch.no_grad():
        return model(prompt, use_cache=True).past_key_values


def eager_step(model, cache, token):
    with torch.no_grad():
        return model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def assert_same(got, want, msg=None):
    # The graphed step runs q/k/v and gate/up as one matmul each and adds the residuals inside the
    # matmuls: the model's math, which a CPU BLAS may round differently in the last bit (seen on a
    # 16-core machine; equal to the bit on 2 cores).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=msg)


def assert_same_cache(cache, reference):
    for layer, ref in zip(cache.layers, reference.layers, strict=True):
        assert layer.lengths == ref.lengths and layer._lengths_dev is None and ref._lengths_dev is None
        assert_same(layer.keys_bshd(), ref.keys_bshd())
        assert_same(layer.values_bshd(), ref.values_bshd())
        assert_same(layer.summaries(), ref.summaries())
        want = subquad.block_summaries(layer.keys_bshd().float(), layer.block_size)
        torch.testing.assert_close(layer.summaries(), want, atol=1e-2, rtol=1e-2)
        bounds, ref_bounds = layer.derived.get("tree_bounds"), ref.derived.get("tree_bounds")
        assert (bounds is None) == (ref_bounds is None)
        if bounds is not None:
            assert bounds.done == ref_bounds.done and bounds.key == ref_bounds.key
            assert_same(bounds.hi[:, :, : bounds.done], ref_bounds.hi[:, :, : bounds.done])
            assert_same(bounds.lo[:, :, : bounds.done], ref_bounds.lo[:, :, : bounds.done])


@pytest.mark.parametrize("batch", [1, 2], ids=["B1", "B2"])
@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_device_step_equals_eager_step(attention, index, batch):
    # capture=False runs the ops the graphs hold: the same logits and cache (up to BLAS rounding), 70 steps
    # (4 key blocks, 2 tree groups, 3 buffer growths), and the same host bookkeeping.
    model = make_model(attention, index)
    prompt = torch.randint(0, 256, (batch, 37))
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache, capture=False)
    token = torch.randint(0, 256, (batch, 1))
    buffer, growths = cache.layers[0]._key_buf, 0
    for _ in range(70):
        want = eager_step(model, reference, token)
        got = decoder.step(token)
        assert_same(got, want)
        growths += cache.layers[0]._key_buf is not buffer
        buffer = cache.layers[0]._key_buf
        token = want.argmax(-1, keepdim=True)
    assert growths == 3 and decoder.captures == 0
    assert_same_cache(cache, reference)
    if attention == "ssa":
        plans = [c.layers[0].derived["decode_plan"] for c in (cache, reference)]
        assert plans[0].blocks_key == plans[1].blocks_key


def test_steps_follow_weights_changed_in_place():
    # The step reads the q/k/v and gate/up projections from concatenated copies: a weight updated in
    # place (an optimizer step, load_state_dict) must reach them before the next step.
    model = make_model("ssa", "flat")
    prompt = torch.randint(0, 256, (1, 20))
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache, capture=False)
    token = torch.randint(0, 256, (1, 1))
    assert_same(decoder.step(token), eager_step(model, reference, token))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1.5)
            layer.mlp.up_proj.weight.add_(0.1)
    assert_same(decoder.step(token), eager_step(model, reference, token))


def test_steps_interleave_with_eager_calls_and_crop():
    # The decoder notices what others did to the cache (eager steps, crop inside and across blocks,
    # buffers it did not grow) and prepares again where needed; the logits stay the eager ones.
    model = make_model("ssa", "tree")
    prompt = torch.randint(0, 256, (2, 40))
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache, capture=False)
    plan = ["graph"] * 12 + ["eager"] * 3 + ["crop-3"] + ["graph"] * 5 + ["crop-20"] + ["graph"] * 30
    plan += ["eager"] * 20 + ["graph"] * 5
    token = torch.randint(0, 256, (2, 1))
    for action in plan:
        if action.startswith("crop"):
            drop = int(action[4:])
            cache.crop(drop)
            reference.crop(drop)
            continue
        want = eager_step(model, reference, token)
        got = decoder.step(token) if action == "graph" else eager_step(model, cache, token)
        assert_same(got, want, msg=action)
        token = want.argmax(-1, keepdim=True)
    assert_same_cache(cache, reference)


class _OpRecorder(TorchDispatchMode):
    """Each aten call as a graph would bake it: the op, its Python arguments, and each tensor argument
    as (shape, stride, dtype) plus where it lives: a tensor made earlier in the step by its producing
    call, any other by its memory address. Counts host syncs (``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.calls, self.syncs, self.made = [], 0, {}

    def _describe(self, value):
        if not isinstance(value, torch.Tensor):
            return repr(value)
        address = value.untyped_storage().data_ptr()
        where = ("made", self.made[address]) if address in self.made else ("at", address)
        return where, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.startswith("_local_scalar_dense"):
            self.syncs += 1
        inputs = tree_flatten((args, kwargs))[0]
        self.calls.append((str(func), tuple(self._describe(x) for x in inputs)))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in {
                x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)
            }:
                self.made[t.untyped_storage().data_ptr()] = len(self.calls) - 1
        return out


@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_prepared_step_is_what_a_graph_replays(attention, index):
    # A graph replays the calls of the step it recorded with their Python numbers, shapes and addresses.
    # So every step between two preparations must make exactly the same calls (in the step itself; the
    # dense twin's attention runs outside the graphs), and none may read the device from the host.
    model = make_model(attention, index)
    prompt = torch.randint(0, 256, (2, 33))
    decoder = GraphedDecoder(model, prefilled(model, prompt), capture=False)
    run = decoder._run

    def outside_graphs(index, q, length):
        with _disable_current_modes():
            return GraphedDecoder._attend_dense(decoder, index, q, length)

    decoder._attend_dense = outside_graphs
    recorded = []

    def recording(length):
        with _OpRecorder() as recorder:
            out = run(length)
        recorded.append(recorder)
        return out

    decoder._run = recording
    token = torch.randint(0, 256, (2, 1))
    for _ in range(6):  # tokens 33..38: one key block (32..47); the first step prepares it
        token = decoder.step(token).argmax(-1, keepdim=True)
    assert all(r.syncs == 0 for r in recorded)
    assert len(recorded[1].calls) > 100
    for later in recorded[2:]:
        assert later.calls == recorded[1].calls
    # The next key block prepares again: the plan (and the views' lengths) differ.
    for _ in range(10):
        token = decoder.step(token).argmax(-1, keepdim=True)
    if attention == "ssa":
        assert recorded[-1].calls != recorded[1].calls
    assert all(r.syncs == 0 for r in recorded)


class _EmulatedGraph:
    """A CPU stand-in for ``cuda_graph.new_graph``'s graphs. Capturing records each aten call with the
    tensors it read and wrote (their memory fixed, as a graph fixes pointers, shapes and Python numbers)
    and then undoes its writes (a capture runs nothing); a replay runs the calls again, writing fresh outputs
    into the recorded ones."""

    def __init__(self):
        self.calls = []

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self._recording = _Recording(self.calls)
        self._recording.__enter__()

    def capture_end(self):
        self._recording.__exit__(None, None, None)
        for tensor, saved in reversed(self._recording.saved):
            tensor.copy_(saved)

    def pool(self):
        return (0, 1)

    def replay(self):
        for func, args, kwargs, outputs in self.calls:
            for recorded, new in zip(outputs, tree_flatten(func(*args, **kwargs))[0]):
                if recorded is not None:
                    recorded.copy_(new)


class _Recording(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls, self.saved = calls, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        assert not func.__name__.startswith("_local_scalar_dense"), "a host sync cannot be captured"
        for i, argument in enumerate(func._schema.arguments):
            value = kwargs.get(argument.name) if argument.kwarg_only or i >= len(args) else args[i]
            if argument.alias_info is not None and argument.alias_info.is_write:
                for tensor in tree_flatten(value)[0]:
                    self.saved.append((tensor, tensor.clone()))
        out = func(*args, **kwargs)
        read = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        outputs = [
            t if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in read else None
            for t in tree_flatten(out)[0]
        ]
        self.calls.append((func, args, kwargs, outputs))
        return out


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_emulated_capture_replays_equal_eager_steps(monkeypatch, attention, index):
    # The capture / replay control flow on the CPU (pieces around the dense twin's attention, re-captures
    # per key block and growth, eager steps and crops in between) with a graph emulated as recorded calls.
    monkeypatch.setattr(cuda_graph, "new_graph", _EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    model = make_model(attention, index)
    prompt = torch.randint(0, 256, (2, 150))
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache, capture=False)
    decoder.capture, decoder._stream = True, _Stream()
    token = torch.randint(0, 256, (2, 1))
    plan = ["graph"] * 100 + ["eager"] * 3 + ["crop-5"] + ["graph"] * 20 + ["crop-30"] + ["graph"] * 10
    blocks, buffer, growths = set(), cache.layers[0]._key_buf, 0
    for step, action in enumerate(plan):
        if action.startswith("crop"):
            cache.crop(int(action[4:]))
            reference.crop(int(action[4:]))
            continue
        if step < 100:
            blocks.add(cache.get_seq_length() // 16)
        want = eager_step(model, reference, token)
        got = decoder.step(token) if action == "graph" else eager_step(model, cache, token)
        assert_same(got, want, msg=f"step {step}, {action}")
        if step < 100:
            growths += cache.layers[0]._key_buf is not buffer
            buffer = cache.layers[0]._key_buf
            # 150 -> 250 tokens: key blocks 9..15; capacity 160 -> 208 -> 272, each growth opening a block.
            assert decoder.captures == (len(blocks) if attention == "ssa" else 1 + growths)
        token = want.argmax(-1, keepdim=True)
    assert growths == 2 and len(decoder._pieces) == (1 if attention == "ssa" else 3)
    assert_same_cache(cache, reference)


@pytest.mark.parametrize("index", ["flat", "tree"])
def test_crop_that_drops_kept_bounds_prepares_again(index):
    # A crop clears the cache layers' derived state, the tree router's kept bounds among them, and their
    # memory goes back to the allocator while a captured graph still reads it. The next step must prepare
    # (and capture) again, not replay. A dead reference used to match the missing bounds (None), and on an
    # H200 the replays after a crop routed over whatever had reused that memory.
    model = make_model("ssa", index)
    cache = prefilled(model, torch.randint(0, 256, (1, 150)))
    decoder = GraphedDecoder(model, cache, capture=False)
    prepared = []
    prepare = decoder._prepare_and_run
    decoder._prepare_and_run = lambda *args: prepared.append(args[1]) or prepare(*args)
    token = torch.randint(0, 256, (1, 1))
    for _ in range(3):
        decoder.step(token)
    assert prepared == [150] and (cache.layers[0].derived.get("tree_bounds") is not None) == (index == "tree")
    cache.crop(-1)  # inside the key block: only what the crop cleared can make the step prepare again
    decoder.step(token)
    assert prepared == ([150, 152] if index == "tree" else [150])


class _FailingOnce(_EmulatedGraph):
    """An emulated graph whose first capture in relaxed mode fails at its end, as CUDA reports a capture
    that something invalidated (e.g. a kernel that had to compile under it)."""

    failures = 1
    recorded: list[int] = []  # calls per successful capture

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.mode = capture_error_mode
        super().capture_begin(pool)

    def capture_end(self):
        super().capture_end()
        if self.mode == "relaxed" and _FailingOnce.failures:
            _FailingOnce.failures -= 1
            raise RuntimeError("operation not permitted when stream is capturing")
        _FailingOnce.recorded.append(len(self.calls))


@pytest.mark.parametrize("index", ["flat", "tree"])
def test_recaptures_skip_the_eager_step_and_fall_back_to_it(monkeypatch, index):
    # After the first capture, a new key block is captured and replayed without an eager step first; the
    # tree router's kept bounds are brought up to the block before that capture (else the graph would
    # record their update). One re-capture fails: that step runs eagerly and captures as the first.
    monkeypatch.setattr(cuda_graph, "new_graph", _FailingOnce)
    monkeypatch.setattr(_FailingOnce, "failures", 1)
    monkeypatch.setattr(_FailingOnce, "recorded", [])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    model = make_model("ssa", index)
    prompt = torch.randint(0, 256, (2, 150))
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache, capture=False)
    decoder.capture, decoder._stream = True, _Stream()
    eager_runs = []
    run = decoder._run
    decoder._run = lambda length: eager_runs.append(length) or run(length)
    token = torch.randint(0, 256, (2, 1))
    for step in range(60):  # 150 -> 210 tokens: key blocks 9..13
        want = eager_step(model, reference, token)
        assert_same(decoder.step(token), want, msg=f"step {step}")
        token = want.argmax(-1, keepdim=True)
    assert decoder.captures == 5 and _FailingOnce.failures == 0
    # The first block's step and the one whose capture failed ran eagerly; the other re-captures did not.
    assert eager_runs == [151, 161]
    # Every graph holds the same calls: none recorded a kept-bounds update (a tree group fills every
    # 2 blocks here), which each replay would redo.
    assert len(_FailingOnce.recorded) == 5 and len(set(_FailingOnce.recorded)) == 1
    assert_same_cache(cache, reference)


@pytest.mark.parametrize("attention, index", [KINDS[1], KINDS[2]], ids=[KIND_IDS[1], KIND_IDS[2]])
def test_generate_equals_model_generate(attention, index):
    model = make_model(attention, index)
    prompt = torch.randint(0, 256, (2, 30))
    want = model.generate(prompt, max_new_tokens=40, do_sample=False)
    decoder = GraphedDecoder(model, capture=False)
    got = decoder.generate(prompt, max_new_tokens=40)
    assert torch.equal(got, want)
    assert decoder.cache.get_seq_length() == 30 + 40 - 1  # the last token is never fed
    # End of sequence: row 0 stops at its 10th new token and pads; row 1 never stops, or also stops.
    for rows in ([0], [0, 1]):
        eos = [int(want[r, 30 + 9 + 5 * r]) for r in rows]
        want_eos = model.generate(
            prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=7
        )
        decoder = GraphedDecoder(model, capture=False)
        got_eos = decoder.generate(prompt, max_new_tokens=40, eos_token_id=eos, pad_token_id=7)
        assert torch.equal(got_eos, want_eos), rows
        assert decoder.cache.get_seq_length() == got_eos.shape[1] - 1
    assert got_eos.shape[1] < want.shape[1]


def test_first_step_into_an_empty_cache_runs_the_model():
    model = make_model("ssa", "tree")
    decoder = GraphedDecoder(model, capture=False)
    reference = subquad.SSACache(model.config)
    token = torch.randint(0, 256, (1, 1))
    for _ in range(20):
        want = eager_step(model, reference, token)
        assert_same(decoder.step(token), want)
        token = want.argmax(-1, keepdim=True)


def test_unsupported_inputs_are_refused():
    for attention in ("ssa", "dense"):
        config = SubquadConfig.from_flavor("debug", attention=attention, position_scheme="local_rope")
        with pytest.raises(ValueError, match="position_scheme='local_rope'"):
            GraphedDecoder(SubquadForCausalLM(config))
    with pytest.raises(ValueError, match="ssa.index='beam'"):
        GraphedDecoder(make_model(index="beam"), capture=False)
    with pytest.raises(ValueError, match="ssa.summary='max'"):
        GraphedDecoder(make_model(ssa={"summary": "max", "sub_block_size": 4}), capture=False)
    model = make_model()
    with pytest.raises(ValueError, match="capture=True: the model is on cpu"):
        GraphedDecoder(model)
    with pytest.raises(TypeError, match="expected a SubquadForCausalLM"):
        GraphedDecoder(torch.nn.Linear(2, 2), capture=False)
    with pytest.raises(ValueError, match="block_size=64"):
        GraphedDecoder(model, subquad.SSACache(subquad.SSAConfig()), capture=False)
    # Rows of different lengths (a left-padded prompt keeps only each row's real tokens).
    prompt = torch.randint(0, 256, (2, 20))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    with torch.no_grad():
        cache = model(prompt, attention_mask=mask, use_cache=True).past_key_values
    decoder = GraphedDecoder(model, cache, capture=False)
    with pytest.raises(ValueError, match=r"rows hold \[20, 15\] tokens"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))
    decoder = GraphedDecoder(model, prefilled(model, prompt), capture=False)
    with pytest.raises(ValueError, match=r"input_ids: got \(2, 2\), expected \[2, 1\]"):
        decoder.step(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: padded rows"):
        decoder.generate(prompt, max_new_tokens=3, attention_mask=mask)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        decoder.generate(prompt, max_new_tokens=0)


# --- CUDA: capture and replay -------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("batch", [1, 2], ids=["B1", "B2"])
@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_cuda_graph_replays_equal_eager_steps(attention, index, batch):
    # bf16 on the decode kernels' path: replays across key blocks (flat SSA re-captures per block, tree
    # SSA per launch layout) and buffer growths (every kind re-captures), then eager steps and crops on
    # the decoder's cache in between.
    model = make_model(attention, index, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, 256, (batch, 150), device="cuda")
    cache, reference = prefilled(model, prompt), prefilled(model, prompt)
    decoder = GraphedDecoder(model, cache)
    token = torch.randint(0, 256, (batch, 1), device="cuda")
    plan = ["graph"] * 100 + ["eager"] * 3 + ["crop-5"] + ["graph"] * 20 + ["crop-30"] + ["graph"] * 10
    for action in plan:
        if action.startswith("crop"):
            cache.crop(int(action[4:]))
            reference.crop(int(action[4:]))
            continue
        want = eager_step(model, reference, token)
        got = decoder.step(token) if action == "graph" else eager_step(model, cache, token)
        # bf16: the graph's GEMVs sum in another order than the eager step's cuBLAS (an ulp apart, 0.03 at
        # 4.0). The tree router's steps after a crop once differed by up to 0.12, varying from run to run:
        # replays read the kept bounds the crop had freed (test_crop_that_drops_kept_bounds_prepares_again;
        # benchmarks/results/decode-early-launch-h200-2026-11-24/call4-graph-vs-eager-*.log).
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
        token = want.argmax(-1, keepdim=True)
    assert decoder.captures > 1 and decoder.capture_seconds > 0
    for layer, ref in zip(cache.layers, reference.layers):
        assert layer.lengths == ref.lengths
        torch.testing.assert_close(layer.keys_bshd(), ref.keys_bshd(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer.summaries(), ref.summaries(), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("index", ["flat", "tree"])
def test_cuda_steps_after_crops_repeat_exactly(index):
    # The same token at the same position after a crop gives the same logits to the bit, with freed memory
    # reused in between. Replays that read the tree router's bounds freed by a crop did not (see
    # test_crop_that_drops_kept_bounds_prepares_again).
    model = make_model("ssa", index, device="cuda", dtype=torch.bfloat16)
    cache = prefilled(model, torch.randint(0, 256, (1, 150), device="cuda"))
    decoder = GraphedDecoder(model, cache)
    token = torch.randint(0, 256, (1, 1), device="cuda")
    for _ in range(3):
        decoder.step(token)
    rows = []
    for _ in range(6):
        cache.crop(-1)
        rows.append(decoder.step(token).clone())
        # Fresh allocations of many sizes, filled with large values, over whatever was freed.
        junk = [torch.full((1 << n,), 1e4 * (n + 1), device="cuda") for n in range(6, 18)]
        del junk
    for row in rows[1:]:
        assert torch.equal(row, rows[0])


@needs_cuda
def test_cuda_steps_with_and_without_pdl_are_equal(monkeypatch):
    # With programmatic dependent launch each decode kernel starts while the one before it runs and
    # waits on the device for it (subquad.ops.pdl): a wait missing or misplaced would read a value
    # before its write. The same tokens give the same logits, bit for bit, with and without it.
    model = make_model("ssa", "tree", device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 150), device="cuda")
    tokens = torch.randint(0, 256, (60, 2, 1), device="cuda")
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        assert pdl.enabled(torch.device("cuda")) == (on and torch.cuda.get_device_capability() >= (9, 0))
        decoder = GraphedDecoder(model, prefilled(model, prompt))
        logits[on] = torch.stack([decoder.step(token) for token in tokens])
    assert torch.equal(logits[True], logits[False])


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.enabled(torch.device("cuda")) and pdl.launch_args(torch.device("cuda")) == {
        "PDL": False,
        "launch_pdl": False,
    }


@needs_cuda
@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_cuda_captures_once_per_launch_layout_or_growth(attention, index):
    model = make_model(attention, index, device="cuda", dtype=torch.bfloat16)
    decoder = GraphedDecoder(model, prefilled(model, torch.randint(0, 256, (1, 150), device="cuda")))
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    blocks, buffer, growths = set(), decoder.cache.layers[0]._key_buf, 0
    for _ in range(100):
        blocks.add(decoder.cache.get_seq_length() // 16)
        decoder.step(token)
        growths += decoder.cache.layers[0]._key_buf is not buffer
        buffer = decoder.cache.layers[0]._key_buf
    # 150 -> 250 tokens: key blocks 9..15; capacity 160 -> 208 -> 272, each growth opening a block.
    assert growths == 2
    if index == "tree":
        # The fused tree step replays across blocks: captures in block 9, 10 (growth), 11 (the window
        # reaches group 5: stretches of 3 groups, padded 2 -> 4) and 13 (growth).
        assert len(blocks) == 7 and decoder.captures == 4
    else:
        assert decoder.captures == (len(blocks) if attention == "ssa" else 1 + growths)


@needs_cuda
@pytest.mark.parametrize("attention, index", KINDS, ids=KIND_IDS)
def test_cuda_generate_equals_model_generate(attention, index):
    model = make_model(attention, index, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 100), device="cuda")
    decoder = GraphedDecoder(model)
    got = decoder.generate(prompt, max_new_tokens=80)
    assert got.shape == (2, 180) and torch.equal(got[:, :100], prompt)
    assert decoder.captures >= 1
    # Greedy: each new token is the model's top choice after the tokens before it, up to bf16 rounding
    # (a graph may run other cuBLAS kernels than the eager step, so exact ties can break either way).
    with torch.no_grad():
        logits = model(got[:, :-1]).logits[:, 99:].float()
    chosen = logits.gather(-1, got[:, 100:, None])[..., 0]
    assert (chosen >= logits.amax(-1) - 5e-2).all()
    want = model.generate(prompt, max_new_tokens=80, do_sample=False)
    assert torch.equal(got[:, :110], want[:, :110])  # no near-tie this early for this seed
