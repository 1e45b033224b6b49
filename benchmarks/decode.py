"""Subquad `small` (random weights): SSA vs the same model with dense SDPA attention, in one process.

Measures (issue 3):
* prefill time and peak memory of a whole prompt (chunked through an SSACache for SSA; one causal
  SDPA forward for dense) at 128K, 1M, 4M, 12M tokens;
* per-token decode latency at 32K .. 12M cached tokens (the cache is filled with random keys and
  values directly: decode cost does not depend on how the cache was filled); the dense twin decodes
  with SDPA over views of the same cache, its query heads grouped per KV head, on flash / efficient /
  math (``modeling.DENSE_DECODE_BACKENDS``): cuDNN, SDPA's first choice on H100/H200, builds an
  execution plan per key length, i.e. per step (``--dense-sdpa-auto`` adds rows with SDPA's choice);
* KV-cache bytes per token;
* ``--graph``: the decode step also through ``subquad.models.GraphedDecoder`` (rows ``timing: graph``),
  the whole model step as CUDA-graph replays (SSA, tree index: one graph for many key blocks; flat index:
  re-captured when a token opens a key block; dense: one graph per stretch between layers' SDPA calls,
  which run eagerly): ms of a replayed step, ms per token over 2 key blocks back to back (re-captures
  included, one sync at the end, as ``GraphedDecoder.generate`` runs), then ms of a step that prepares
  and captures (its eager step plus the capture, forced 3 times) and of the capture alone (host time:
  recording and instantiation). On the CPU the graphed step's ops run eagerly (``capture=False``). The
  graphs are recorded through the driver (``subquad.ops.cuda_graph``): on an H200 every graph of a process
  replays ~4% slower once it has recorded four through ``torch.cuda.CUDAGraph`` (``benchmarks/NOTES.md``
  items 52 and 90); ``--torch-graphs`` records with torch's, to compare;
* ``--only attention``: one decode layer's attention alone, no model around it, so the operator is
  compared and not the eager model step (whose ~900 kernel launches bound both sides): for the
  ``layer-8b`` shape (Hq 32, Hkv 8, D 128) and the flavor's attention shape, B=1, a random
  ``SSACache`` layer of N tokens holds the keys, values, block summaries and the tree router's kept
  bounds as in a model's decode; the step is what ``SubquadAttention`` runs after appending the new
  token: SSA = routing (``--index``) + the split-K decode kernel (``decode_step``), dense = the dense
  twin's SDPA call (``modeling._dense_decode``, on ``DENSE_DECODE_BACKENDS``) over views of the same
  cache. The cache length stays fixed: the same position (the last cached token) is decoded again
  each repeat, nothing is appended; the routing plan, built once per model step and shared by its
  layers, is built outside the timed step. Each step is timed eagerly (CUDA events around one step:
  launch overhead included) and as a CUDA-graph replay (captured once: launch overhead removed on
  both sides); L2 is flushed before every sample (``--warm-l2`` keeps it). Rows give ms per step and
  the bytes the step reads (dense: every key and value; SSA: the selected blocks plus the routing
  reads, from the selection sizes) with the GB/s they imply.

Dense runs only up to ``--dense-max-prefill`` / ``--dense-max-decode`` tokens (it is quadratic, or its
cache does not fit); out-of-memory is recorded, not fatal. Results go to ``benchmarks/results/`` as
JSON and markdown (GPU, torch, triton, date); a short table is printed last.

GPU (H200; each command stays under the 10-minute job limit):
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only decode
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only decode --graph \
        --decode-lengths 131072 1048576 4194304
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only decode --dense-sdpa-auto \
        --decode-lengths 131072 1048576 4194304
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --prefill-lengths 131072 1048576
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --skip-dense \
        --prefill-lengths 4194304
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --skip-dense \
        --prefill-lengths 12582912
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only attention \
        --decode-lengths 131072 1048576 4194304 12582912 --out $OUT
CPU check (tiny model and lengths, seconds):
    python benchmarks/decode.py --device cpu --quick
    python benchmarks/decode.py --device cpu --quick --only decode --graph
    python benchmarks/decode.py --device cpu --quick --only attention
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import subquad  # noqa: E402
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM, prefill  # noqa: E402
from subquad.models.subquad import modeling  # noqa: E402
from subquad.ops import cuda_graph  # noqa: E402
from subquad.ops.ssa.config import INDEXES  # noqa: E402
from subquad.ops.ssa.interface import resolve_backend  # noqa: E402
from subquad.ops.ssa.select import (  # noqa: E402
    _own_group_slots,
    beam_cost_per_query,
    beam_routes_flat,
    tree_shape,
)
from subquad.ops.ssa.triton_decode import decode_plan, decode_step, kept_index  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K, M = 1 << 10, 1 << 20
# --only attention: the attention shape of one layer of a Llama-3-8B-like model (Hq, Hkv, D).
LAYER_8B = (32, 8, 128)
# Bytes written before each timed sample to evict the H200's L2 (50 MB) unless --warm-l2.
L2_FLUSH_BYTES = 256 * M


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="debug flavor and tiny lengths (CPU check)")
    p.add_argument("--flavor", default=None, help="model flavor (default small; debug with --quick)")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=None)
    p.add_argument("--decode-lengths", type=int, nargs="*", default=None)
    p.add_argument("--dense-max-prefill", type=int, default=1 * M)
    p.add_argument("--dense-max-decode", type=int, default=12 * M + 512 * K)
    p.add_argument(
        "--chunk", type=int, default=None, help="SSA prefill chunk (default 64K; 256 with --quick)"
    )
    p.add_argument("--index", default="tree", choices=INDEXES, help="SSA router")
    p.add_argument(
        "--position-scheme",
        default="rope",
        choices=["rope", "local_rope"],
        help="rope uses the Triton kernels; local_rope runs on the torch path",
    )
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument(
        "--only",
        choices=["prefill", "decode", "attention"],
        default=None,
        help="attention: one layer's decode attention alone, SSA vs dense, eager and CUDA graph (never in "
        "the default run)",
    )
    p.add_argument(
        "--warm-l2",
        action="store_true",
        help="--only attention: do not flush L2 before each timed sample (repeats then find SSA's few "
        "blocks in L2)",
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help="also time the model's decode step through GraphedDecoder (CUDA-graph replays; its ops run "
        "eagerly on the CPU), rows 'timing: graph'",
    )
    p.add_argument(
        "--torch-graphs",
        action="store_true",
        help="--graph: record the steps with torch.cuda.CUDAGraph, not through the driver "
        "(subquad.ops.cuda_graph), to compare the two",
    )
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument(
        "--dense-sdpa-auto",
        action="store_true",
        help="also decode with the dense twin on SDPA's own backend choice (cuDNN first on H100/H200, "
        "which builds a plan per key length); the dense rows use flash/efficient/math",
    )
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.graph and args.index == "beam":
        p.error("--graph: the graphed decode step supports --index flat and tree, not beam")
    quick = args.quick
    # --only attention times the `small` attention shape even with --quick (it is cheap on a CPU).
    args.attention_flavor = args.flavor or "small"
    args.flavor = args.flavor or ("debug" if quick else "small")
    if args.only == "attention" and quick and not args.decode_lengths:
        args.decode_lengths = [4 * K, 16 * K]
    args.prefill_lengths = args.prefill_lengths or ([512, 2048] if quick else [128 * K, M, 4 * M, 12 * M])
    args.decode_lengths = args.decode_lengths or (
        [256, 1024, 4096] if quick else [32 * K, 128 * K, M, 4 * M, 12 * M]
    )
    args.chunk = args.chunk or (256 if quick else 64 * K)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    return args


class Timer:
    """Wall time on CPU, CUDA events on GPU; peak memory on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def time(self, fn) -> tuple[float, object]:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def build_models(args, device):
    ssa_cfg = SubquadConfig.from_flavor(
        args.flavor,
        position_scheme=args.position_scheme,
        ssa={"index": args.index},
        prefill_chunk_tokens=args.chunk,
    )
    torch.manual_seed(0)
    sparse = SubquadForCausalLM(ssa_cfg).to(device=device, dtype=args.dtype).eval()
    dense_cfg = SubquadConfig.from_flavor(
        args.flavor, attention="dense", position_scheme="rope", prefill_chunk_tokens=1 << 30
    )
    dense = SubquadForCausalLM(dense_cfg).to(device=device, dtype=args.dtype).eval()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_prefill(model, length, chunk, device, timer):
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    cache = subquad.SSACache(model.config, max_length=length + 64)
    timer.reset_peak()
    seconds, out = timer.time(lambda: prefill(model, ids, chunk_size=chunk, cache=cache, logits_to_keep=1))
    result = dict(
        seconds=seconds,
        peak_gb=timer.peak_gb(),
        tokens_per_s=length / seconds,
        cache_bytes_per_token=cache.bytes_per_token(),
    )
    return result


def fill_cache(model, length, device, room: int) -> subquad.SSACache:
    """A cache holding ``length`` random keys/values per layer (appended in slices to bound temporaries),
    with ``room`` more tokens allocated: the decode timings append up to that many before they crop
    back, and a buffer grown mid-run (by a quarter, a copy of the whole cache) does not fit at 12M."""
    cfg = model.config
    cache = subquad.SSACache(cfg, max_length=length + room)
    dtype = next(model.parameters()).dtype
    step = 1 << 20
    for i in range(cfg.num_hidden_layers):
        layer = cache.layer(i)
        for start in range(0, length, step):
            n = min(step, length - start)
            kv = torch.randn(2, 1, n, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=dtype)
            layer.append(kv[0], kv[1])
            del kv
    return cache


def run_decode(model, cache, steps, device, timer):
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    with torch.no_grad():
        for _ in range(3):
            model(token, past_key_values=cache)
        times = []
        for _ in range(steps):
            seconds, _ = timer.time(lambda: model(token, past_key_values=cache))
            times.append(seconds)
    cache.crop(-(steps + 3))  # back to the requested length for the next model
    return dict(ms_per_token=1e3 * statistics.median(times))


def graph_decode_room(steps: int, block_size: int) -> int:
    """Tokens :func:`run_decode_graph` appends past the cache's length before it crops back: 3 untimed
    steps, ``steps`` timed ones, 2 runs of 2 key blocks, 3 prepared steps (and one more)."""
    return 3 + steps + 2 * (2 * block_size) + 3 + 1


def run_decode_graph(model, cache, steps, device, timer):
    """``--graph``: the decode step through ``GraphedDecoder`` (on the CPU, ``capture=False``): median ms
    of a replayed step (``ms_per_token``); ms per token over 2 key blocks back to back, re-captures
    included, one sync at the end, after 2 blocks untimed (``ms_per_token_run``, ``captures_per_run``);
    then, forced 3 times (``invalidate``), the median ms of a step that prepares and captures
    (``prepare_step_ms``: its eager step plus the capture) and the capture's host time alone
    (``capture_ms``). The forced captures come last: with ``--torch-graphs`` they would make the timed
    steps replay in a process that has recorded four of torch's graphs (module docstring)."""
    cuda = device.type == "cuda"
    decoder = GraphedDecoder(model, cache, capture=cuda)
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    start = cache.get_seq_length()
    block_size = model.config.ssa_config.block_size
    # Room for everything below up front, so no buffer grows (a one-off copy of the whole cache, and a
    # re-capture) inside the timed steps.
    cache.reserve(start + graph_decode_room(steps, block_size))
    with torch.no_grad():
        for _ in range(3):  # the first prepares and captures; then replays
            decoder.step(token)
        times = []
        for _ in range(steps):
            seconds, _ = timer.time(lambda: decoder.step(token))
            times.append(seconds)
        run = 2 * block_size
        # Steady decoding, as generate() runs it: 2 blocks untimed first, which compile the Triton
        # variants new block counts ask for (integer arguments are specialised by divisibility).
        for _ in range(run):
            decoder.step(token)
        captures = decoder.captures
        seconds, _ = timer.time(lambda: [decoder.step(token) for _ in range(run)])
        captures = decoder.captures - captures
        prepare, capture = [], []
        for _ in range(3):
            decoder.invalidate()
            seconds_prepare, _ = timer.time(lambda: decoder.step(token))
            prepare.append(seconds_prepare)
            capture.append(decoder.capture_seconds)
    cache.crop(start - cache.get_seq_length())  # back to the requested length for the next model
    row = dict(
        ms_per_token=1e3 * statistics.median(times),
        ms_per_token_run=1e3 * seconds / run,
        captures_per_run=captures,
        prepare_step_ms=1e3 * statistics.median(prepare),
        capture_ms=1e3 * statistics.median(capture) if cuda else None,
    )
    if not cuda:
        row["note"] = "CPU: the graphed step's ops run eagerly (capture=False)"
    return row


def attention_shapes(args) -> dict[str, tuple[int, int, int]]:
    """``--only attention`` shapes: name -> (Hq, Hkv, D)."""
    cfg = SubquadConfig.from_flavor(args.attention_flavor)
    small = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    return {"layer-8b": LAYER_8B, args.attention_flavor: small}


def fill_attention_cache(ssa, length, heads_kv, dim, device, dtype):
    """One ``SSACache`` layer holding ``length`` random keys/values, appended in slices (bounded temporaries,
    no float32 copy of the cache), its summaries maintained by the appends as in a model's prefill."""
    cache = subquad.SSACache(ssa, num_layers=1, max_length=length)
    layer = cache.layer(0)
    step = 1 << 19
    for start in range(0, length, step):
        n = min(step, length - start)
        kv = torch.randn(2, 1, n, heads_kv, dim, device=device, dtype=dtype)
        layer.append(kv[0], kv[1])
        del kv
    return layer


def attention_bytes_read(attention, tokens, heads_kv, dim, itemsize, ssa) -> int:
    """Bytes one decode step reads (a model of it): dense, every cached key and value; SSA, the keys and
    values of its selected blocks plus the routing reads (float32 summaries: the tree's group bounds and
    the probed groups' blocks; the beam's level-2 bounds and its gathered rows; the flat router's every
    block)."""
    token_kv = 2 * heads_kv * dim * itemsize
    if attention != "ssa":
        return tokens * token_kv
    bs = ssa.block_size
    slots = ssa.sink_blocks + ssa.local_blocks + ssa.top_k
    num_blocks = -(-tokens // bs)
    summary = heads_kv * dim * 4
    if ssa.index == "tree":
        group, probe = tree_shape(num_blocks, ssa)
        num_groups = -(-num_blocks // group)
        routing = (2 * num_groups + (min(probe, num_groups) + _own_group_slots(ssa, group)) * group) * summary
    elif ssa.index == "beam" and not beam_routes_flat(num_blocks, ssa):
        routing = beam_cost_per_query(num_blocks, ssa) * summary
    else:
        routing = num_blocks * summary
    return min(tokens, slots * bs) * token_kv + routing


def attention_steps(layer, q, ssa) -> dict:
    """The two decode steps over ``layer`` for the query ``q [1, 1, Hq, D]`` sitting at the layer's last
    position (the state after a model appended the new token), as ``SubquadAttention`` runs them:
    ``_decode_sparse`` (routing + split-K kernel) and ``_dense_decode`` (the dense twin's SDPA call)."""
    k, v, summaries = layer.keys_bshd(), layer.values_bshd(), layer.summaries()
    plan = decode_plan(layer.seqlens, summaries.shape[1], ssa, layer.lengths)
    kept = kept_index(layer.derived, ssa)
    backend = resolve_backend("auto", q, v)
    scale = q.shape[-1] ** -0.5
    return {
        "ssa": lambda: decode_step(q, k, v, summaries, plan, ssa, scale, backend, kept)[0],
        "dense": lambda: modeling._dense_decode(q, k, v, scale),
    }


def time_eager(fn, device, repeats, flush):
    """Median ms of one call of ``fn`` (after 3 warm-up calls): ``Timer.time``, so CUDA events around
    it with the GPU idle before (launch overhead counts); wall time on the CPU."""
    for _ in range(3):
        out = fn()
    timer = Timer(device)
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        seconds, out = timer.time(fn)
        samples.append(1e3 * seconds)
    return statistics.median(samples), out


def time_graph(fn, repeats, flush):
    """Median ms of one replay of ``fn`` captured in a CUDA graph (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()  # the first replay uploads the graph
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(repeats)]
    for start, stop in events:
        if flush is not None:
            flush.zero_()
        start.record()
        graph.replay()
        stop.record()
    torch.cuda.synchronize()
    out = out.clone()
    del graph
    return statistics.median(start.elapsed_time(stop) for start, stop in events), out


def run_attention(args, device) -> list[dict]:
    """``--only attention``: one decode layer's attention, SSA vs dense, eager and in a CUDA graph."""
    ssa = SubquadConfig.from_flavor(args.attention_flavor, ssa={"index": args.index}).ssa_config
    flush = None
    if device.type == "cuda" and not args.warm_l2:
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    rows: list[dict] = []
    for length in args.decode_lengths:
        for shape, heads in attention_shapes(args).items():
            try:
                rows += attention_rows(args, device, ssa, shape, heads, length, flush)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not is_oom(err):
                    raise
                gb = length * 2 * heads[1] * heads[2] * args.dtype.itemsize / 1e9
                note = f"OOM (cache: {gb:.1f} GB of K/V)"
                print(f"attention {shape}, {length:,} tokens: skipped, {note}", file=sys.stderr)
                skipped = dict(kind="attention", shape=shape, tokens=length, attention="ssa", timing="eager")
                rows.append(dict(skipped, error=note))
            free(device)
    return rows


def attention_rows(args, device, ssa, shape, heads, length, flush) -> list[dict]:
    """Rows of one shape at one length: each attention kind, eager and graph (the cache lives only here)."""
    heads_q, heads_kv, dim = heads
    layer = fill_attention_cache(ssa, length, heads_kv, dim, device, args.dtype)
    q = torch.randn(1, 1, heads_q, dim, device=device, dtype=args.dtype)
    steps = attention_steps(layer, q, ssa)
    variants = [("ssa", None)]
    if not args.skip_dense and length <= args.dense_max_decode:
        variants.append(("dense", modeling.DENSE_DECODE_BACKENDS))
        if args.dense_sdpa_auto:
            variants.append(("dense-sdpa-auto", None))
    rows = []
    for name, backends in variants:
        read = attention_bytes_read(name, length, heads_kv, dim, args.dtype.itemsize, ssa)
        row = dict(kind="attention", shape=shape, tokens=length, attention=name, bytes_read=read)
        # The dense twin's decode step runs under this backend restriction on CUDA (SubquadModel.forward).
        context = sdpa_kernel(backends) if device.type == "cuda" and backends is not None else nullcontext()
        with context:
            timed = time_attention_step(steps["ssa" if name == "ssa" else "dense"], row, device, args, flush)
        for r in timed:
            rows.append(r)
            _echo(r)
    return rows


def time_attention_step(step, row, device, args, flush) -> list[dict]:
    """``row`` timed eagerly and in a CUDA graph: ``[eager row, graph row]``, failures noted in ``error``."""
    eager, graphed = dict(row, timing="eager"), dict(row, timing="graph")
    try:
        ms, reference = time_eager(step, device, args.decode_steps, flush)
        eager.update(ms_per_step=ms, gb_per_s=row["bytes_read"] / ms / 1e6)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        eager["error"] = graphed["error"] = "OOM"
        return [eager, graphed]
    if device.type != "cuda":
        graphed["error"] = "n/a on CPU"
        return [eager, graphed]
    try:
        ms, out = time_graph(step, 5 * args.decode_steps, flush)
        graphed.update(ms_per_step=ms, gb_per_s=row["bytes_read"] / ms / 1e6)
        graphed["max_abs_diff_vs_eager"] = (out.float() - reference.float()).abs().max().item()
    except Exception as err:  # noqa: BLE001 - a step that cannot be captured is a result to report
        if is_oom(err):
            graphed["error"] = "OOM"
        else:
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            graphed["error"] = f"graph: not capturable ({type(err).__name__}: {reason})"
        free(device)
    return [eager, graphed]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.only == "attention":
        return main_attention(args, device)
    timer = Timer(device)
    cuda_graph.DRIVER = not args.torch_graphs
    sparse, dense = build_models(args, device)
    cfg = sparse.config
    env = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=_triton_version(),
        flavor=args.flavor,
        params_m=sum(p.numel() for p in sparse.parameters()) / 1e6,
        dtype=str(args.dtype).replace("torch.", ""),
        ssa=cfg.ssa,
        position_scheme=args.position_scheme,
        prefill_chunk=args.chunk,
        dense_decode_backends=[b.name for b in modeling.DENSE_DECODE_BACKENDS or []] or "sdpa auto",
        graphs="driver" if cuda_graph.DRIVER and cuda_graph.driver_graphs_available() else "torch",
        command="python " + " ".join(sys.argv),
    )
    rows: list[dict] = []
    with torch.no_grad():
        # Warm-up: compile kernels and fill allocator pools outside the timed runs.
        warm = min(4 * args.chunk, 8192)
        run_prefill(sparse, warm, args.chunk, device, timer)
        if not args.skip_dense:
            run_prefill(dense, warm, warm, device, timer)

        if args.only in (None, "prefill"):
            for length in args.prefill_lengths:
                for name, model, chunk, limit in (
                    ("ssa", sparse, args.chunk, None),
                    ("dense", dense, length, args.dense_max_prefill),
                ):
                    if name == "dense" and (args.skip_dense or length > limit):
                        continue
                    row = dict(kind="prefill", attention=name, tokens=length)
                    try:
                        row.update(run_prefill(model, length, chunk, device, timer))
                    except (RuntimeError, torch.OutOfMemoryError) as err:
                        if not is_oom(err):
                            raise
                        row["error"] = "OOM"
                    free(device)
                    rows.append(row)
                    _echo(row)

        if args.only in (None, "decode"):
            for length in args.decode_lengths:
                try:
                    room = graph_decode_room(args.decode_steps, cfg.ssa_config.block_size)
                    cache = fill_cache(sparse, length, device, room)
                except (RuntimeError, torch.OutOfMemoryError) as err:
                    if not is_oom(err):
                        raise
                    rows.append(dict(kind="decode", attention="ssa", tokens=length, error="OOM (cache)"))
                    free(device)
                    continue
                kv_only = (
                    cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * sparse.dtype.itemsize
                )
                variants = [("ssa", sparse), ("dense", dense)]
                if args.dense_sdpa_auto:
                    variants.append(("dense-sdpa-auto", dense))
                for name, model in variants:
                    if name != "ssa" and (args.skip_dense or length > args.dense_max_decode):
                        continue
                    timings = ["eager"] + (["graph"] if args.graph and name != "dense-sdpa-auto" else [])
                    for timing in timings:
                        row = dict(
                            kind="decode",
                            attention=name,
                            timing=timing,
                            tokens=length,
                            kv_bytes_per_token=kv_only if name != "ssa" else cache.bytes_per_token(),
                        )
                        chosen = modeling.DENSE_DECODE_BACKENDS
                        if name == "dense-sdpa-auto":
                            modeling.DENSE_DECODE_BACKENDS = None
                        run = run_decode if timing == "eager" else run_decode_graph
                        try:
                            row.update(run(model, cache, args.decode_steps, device, timer))
                        except (RuntimeError, torch.OutOfMemoryError) as err:
                            if not is_oom(err):
                                raise
                            row["error"] = "OOM"
                        finally:
                            modeling.DENSE_DECODE_BACKENDS = chosen
                        rows.append(row)
                        _echo(row)
                        free(device)
                del cache
                free(device)

    report = dict(env=env, rows=rows, summary=summarize(rows))
    write(report, Path(args.out), device)
    print(table(report))
    return report


def main_attention(args, device) -> dict:
    ssa = SubquadConfig.from_flavor(args.attention_flavor, ssa={"index": args.index}).ssa
    env = dict(
        mode="attention",
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=_triton_version(),
        dtype=str(args.dtype).replace("torch.", ""),
        shapes={
            name: dict(heads_q=hq, heads_kv=hkv, head_dim=d)
            for name, (hq, hkv, d) in attention_shapes(args).items()
        },
        ssa=ssa,
        dense_decode_backends=[b.name for b in modeling.DENSE_DECODE_BACKENDS or []] or "sdpa auto",
        l2_flushed=device.type == "cuda" and not args.warm_l2,
        command="python " + " ".join(sys.argv),
    )
    with torch.no_grad():
        rows = run_attention(args, device)
    report = dict(env=env, rows=rows, summary=summarize(rows))
    write(report, Path(args.out), device, name="decode-attention")
    print(table(report))
    return report


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _echo(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def summarize(rows: list[dict]) -> dict:
    """The issue's targets as ratios measured side by side."""
    out = summarize_attention(rows)
    get = {
        (r["kind"], r["attention"], r["tokens"], r.get("timing", "eager")): r
        for r in rows
        if "error" not in r and r["kind"] != "attention"
    }
    for length in sorted({r["tokens"] for r in rows}):
        s, d = get.get(("prefill", "ssa", length, "eager")), get.get(("prefill", "dense", length, "eager"))
        if s and d:
            out[f"prefill_speedup_{length}"] = d["seconds"] / s["seconds"]
        s, d = get.get(("decode", "ssa", length, "eager")), get.get(("decode", "dense", length, "eager"))
        if s and d:
            out[f"decode_speedup_{length}"] = d["ms_per_token"] / s["ms_per_token"]
        auto = get.get(("decode", "dense-sdpa-auto", length, "eager"))
        if d and auto:
            out[f"dense_sdpa_auto_vs_dense_{length}"] = auto["ms_per_token"] / d["ms_per_token"]
        # --graph: dense / SSA with both graphed, and each model's eager / graphed step.
        sg, dg = get.get(("decode", "ssa", length, "graph")), get.get(("decode", "dense", length, "graph"))
        if sg and dg:
            out[f"decode_speedup_graph_{length}"] = dg["ms_per_token"] / sg["ms_per_token"]
        for name, eager, graph in (("ssa", s, sg), ("dense", d, dg)):
            if eager and graph:
                out[f"decode_graph_vs_eager_{name}_{length}"] = eager["ms_per_token"] / graph["ms_per_token"]
    for timing, suffix in (("eager", ""), ("graph", "_graph")):
        decode = sorted(
            (r["tokens"], r["ms_per_token"])
            for (kind, att, _, t), r in get.items()
            if kind == "decode" and att == "ssa" and t == timing
        )
        if len(decode) >= 2:
            out[f"decode_latency_ratio_longest_vs_shortest{suffix}"] = decode[-1][1] / decode[0][1]
    return out


def summarize_attention(rows: list[dict]) -> dict:
    """``attention_decode_speedup[_eager]_<shape>_<N>``: dense ms / SSA ms of one layer's decode step, in
    a CUDA graph (and eagerly); ``attention_ssa_latency_ratio_longest_vs_shortest_<shape>`` (graph)."""
    get = {
        (r["shape"], r["attention"], r["tokens"], r["timing"]): r["ms_per_step"]
        for r in rows
        if r["kind"] == "attention" and "error" not in r
    }
    out = {}
    for shape, _, length, timing in sorted(k for k in get if k[1] == "ssa"):
        dense = get.get((shape, "dense", length, timing))
        if dense is not None:
            name = "" if timing == "graph" else "eager_"
            sparse = get[(shape, "ssa", length, timing)]
            out[f"attention_decode_speedup_{name}{shape}_{length}"] = dense / sparse
    for shape in sorted({k[0] for k in get}):
        ssa = sorted((k[2], ms) for k, ms in get.items() if k[:2] == (shape, "ssa") and k[3] == "graph")
        if len(ssa) >= 2:
            out[f"attention_ssa_latency_ratio_longest_vs_shortest_{shape}"] = ssa[-1][1] / ssa[0][1]
    return out


def attention_table(report: dict) -> str:
    env = report["env"]
    shapes = ", ".join(f"{name} (Hq {s['heads_q']}, Hkv {s['heads_kv']}, D {s['head_dim']})"
                       for name, s in env["shapes"].items())  # fmt: skip
    lines = [
        f"# One decode layer's attention, SSA vs dense (B=1): {env['device']}, torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}",
        "",
        f"Command: `{env['command']}`  ",
        f"dtype {env['dtype']}, shapes {shapes}, SSA {env['ssa']}, dense SDPA backends "
        f"{env['dense_decode_backends']}, L2 flushed before each sample: {env['l2_flushed']}",
        "",
        "eager: CUDA events around one step, the GPU idle before it (launch overhead included); graph: one "
        "replay of the step captured in a CUDA graph (launch overhead removed). The cache length stays "
        "fixed (the same position decoded each repeat). Bytes read: dense, every cached key and value; "
        "SSA, its selected blocks' keys and values plus the routing reads (a model of the step).",
        "",
        "| shape | tokens | attention | timing | ms/step | bytes read | GB/s | note |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        cells = [_cell(r, "ms_per_step", ".4f"), _cell(r, "bytes_read", ",.0f"), _cell(r, "gb_per_s", ".1f")]
        head = f"| {r['shape']} | {r['tokens']:,} | {r['attention']} | {r['timing']} | "
        lines.append(head + " | ".join(cells) + f" | {r.get('error', '')} |")
    return "\n".join(lines + _ratio_lines(report))


def table(report: dict) -> str:
    env = report["env"]
    if env.get("mode") == "attention":
        return attention_table(report)
    lines = [
        f"# Subquad `{env['flavor']}` prefill/decode: {env['device']}, torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}",
        "",
        f"Command: `{env['command']}`  ",
        f"dtype {env['dtype']}, position scheme {env['position_scheme']}, SSA {env['ssa']}, "
        f"prefill chunk {env['prefill_chunk']}, {env['params_m']:.1f}M parameters",
        "",
        "Decode timing: eager, the model's forward per token; graph (`--graph`), `GraphedDecoder`: ms/token "
        "of a replayed step, ms/token over 2 key blocks back to back (re-captures included), ms of a step "
        "that prepares and captures (its eager step plus the capture) and of the capture alone (host).",
        "",
        "| kind | attention | timing | tokens | prefill s | peak GB | decode ms/token | ms/token, 2 blocks "
        "| prepare + capture ms | capture ms | KV bytes/token | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        cells = [
            _cell(r, "seconds", ".3f"),
            _cell(r, "peak_gb", ".2f"),
            _cell(r, "ms_per_token", ".3f"),
            _cell(r, "ms_per_token_run", ".3f"),
            _cell(r, "prepare_step_ms", ".1f"),
            _cell(r, "capture_ms", ".1f"),
            _cell(r, "kv_bytes_per_token", ",.0f"),
        ]
        head = f"| {r['kind']} | {r['attention']} | {r.get('timing', '')} | {r['tokens']:,} | "
        lines.append(head + " | ".join(cells) + f" | {r.get('error', r.get('note', ''))} |")
    return "\n".join(lines + _ratio_lines(report))


def _ratio_lines(report: dict) -> list[str]:
    """The summary ratios as a markdown table (none: no lines)."""
    if not report["summary"]:
        return []
    return ["", "| ratio | value |", "| --- | ---: |"] + [
        f"| {k} | {v:.2f} |" for k, v in report["summary"].items()
    ]


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else ""


def write(report: dict, out_dir: Path, device: torch.device, name: str = "decode") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"{name}-{device.type}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    base.with_suffix(".md").write_text(table(report) + "\n")
    print(f"wrote {base}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
