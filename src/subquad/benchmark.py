"""Attention benchmark: SSA against dense baselines on the same inputs, in the same process.

Used by ``subquad bench`` and ``benchmarks/attention.py``. Per length it times the routing
(selection), the sparse attention, their sum, torch SDPA's flash backend (FlashAttention-2) and its
cuDNN backend, optionally FlexAttention running the same selection as a mask, and forward+backward.
Times are medians of CUDA-event (or wall-clock on a CPU) timings after warm-up. Dense times beyond
``dense_max_len`` are extrapolated from the dense TFLOP/s measured at the longest length that ran,
and labelled ``extrapolated``. Results: JSON + markdown + a log-log PNG in ``out_dir``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.interface import resolve_backend, ssa_attention
from subquad.ops.ssa.select import SSASelection, select_blocks
from subquad.ops.ssa.tiles import tile_overhead

# name -> (Hq, Hkv, D, default lengths on a GPU)
SHAPES = {
    "layer-8b": (32, 8, 128, [16384, 65536, 131072, 262144, 524288, 1048576]),
    "long": (8, 2, 128, [1048576, 2097152, 4194304, 8388608, 12582912]),
}
CPU_LENGTHS = [1024, 2048]


@dataclass
class Row:
    shape: str
    seq_len: int
    top_k: int
    index: str
    select_ms: float | None = None
    attention_ms: float | None = None
    total_ms: float | None = None
    sparse_tflops: float | None = None
    executed_tflops: float | None = None
    tile_overhead: float | None = None
    forward_path: str | None = None
    keys_per_query: float | None = None
    peak_gib: float | None = None
    flash_ms: float | None = None
    cudnn_ms: float | None = None
    dense_extrapolated: bool = False
    flex_ms: float | None = None
    speedup_vs_flash: float | None = None
    speedup_vs_cudnn: float | None = None
    fwd_bwd_ms: float | None = None
    flash_fwd_bwd_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def dense_flops(
    seq_len_q: int, seq_len_k: int, heads: int, head_dim: int, causal: bool, mode: str = "fwd"
) -> float:
    """FLOPs of dense attention (two matmuls, 2 FLOPs per multiply-add; causal halves the square)."""
    pairs = seq_len_q * seq_len_k
    if causal:
        pairs = seq_len_q * (seq_len_k - seq_len_q) + seq_len_q * (seq_len_q + 1) / 2
    fwd = 4.0 * pairs * heads * head_dim
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def median_timer(device: torch.device, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` ``warmup`` times, then times ``reps`` runs (CUDA events on a GPU,
    wall clock on a CPU) and returns the median in milliseconds."""

    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    chosen = backend[backend_name]

    def call(q, k, v):
        with sdpa_kernel([chosen]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return call


def _flex_same_selection(q, k, v, selection: SSASelection):
    """FlexAttention executing the SSA selection as a mask (per-token lookup table)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads_q, seq_len, _ = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    num_blocks = -(-seq_len // selection.block_size)
    table = torch.zeros(batch, heads_kv, seq_len, num_blocks + 1, dtype=torch.bool, device=q.device)
    table.scatter_(-1, selection.block_idx.long().clamp(min=-1) % (num_blocks + 1), True)
    table[..., num_blocks] = False
    bs = selection.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h // group, q_idx, kv_idx // bs] & (kv_idx <= q_idx)

    block_mask = create_block_mask(mask_mod, batch, heads_q, seq_len, seq_len, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def _environment(device: torch.device) -> dict:
    info = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "command": " ".join(sys.argv),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def run_benchmark(
    shape: str = "layer-8b",
    lengths: list[int] | None = None,
    top_ks: tuple[int, ...] = (16,),
    index: str = "flat",
    device: str | None = None,
    dense_max_len: int = 131072,
    flex_max_len: int = 16384,
    backward_max_len: int = 131072,
    warmup: int = 1,
    reps: int = 3,
    time_budget_s: float = 240.0,
    out_dir: str | Path | None = "benchmarks/results",
    tag: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the sweep and save it; returns ``{"environment": ..., "rows": [...]}``."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: expected one of {sorted(SHAPES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heads_q, heads_kv, head_dim, default_lengths = SHAPES[shape]
    if lengths is None:
        lengths = default_lengths if dev.type == "cuda" else CPU_LENGTHS
    for n in lengths:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths: {n!r} is not a positive int")
    if reps < 1:
        raise ValueError(f"reps={reps!r}: expected at least 1 timed repetition")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    # The CPU runs the PyTorch reference: one untimed warm-up is not worth its minutes there.
    timed = median_timer(dev, warmup if dev.type == "cuda" else 0, reps)
    rows: list[Row] = []
    dense_rate: dict[str, float] = {}
    started = time.perf_counter()
    for seq_len in lengths:
        for top_k in top_ks:
            if time.perf_counter() - started > time_budget_s:
                rows.append(Row(shape, seq_len, top_k, index, notes=["skipped: time budget spent"]))
                continue
            row = Row(shape, seq_len, top_k, index)
            rows.append(row)
            try:
                _measure(
                    row,
                    dev,
                    dtype,
                    heads_q,
                    heads_kv,
                    head_dim,
                    timed,
                    dense_rate,
                    dense_max_len,
                    flex_max_len,
                    backward_max_len,
                )
            except torch.OutOfMemoryError as exc:  # report the ceiling instead of losing the sweep
                row.notes.append(f"out of memory: {str(exc).splitlines()[0]}")
                torch.cuda.empty_cache()
            if progress:
                print(_format_row(row), flush=True)
    result = {"environment": _environment(dev), "shape": shape, "rows": [asdict(r) for r in rows]}
    if out_dir is not None:
        save_results(result, Path(out_dir), tag or f"attention-{shape}-{dev.type}")
    return result


def _measure(
    row,
    dev,
    dtype,
    heads_q,
    heads_kv,
    head_dim,
    timed,
    dense_rate,
    dense_max_len,
    flex_max_len,
    backward_max_len,
):
    seq_len, config = row.seq_len, SSAConfig(top_k=row.top_k, index=row.index)
    gen = torch.Generator(device=dev).manual_seed(seq_len + row.top_k)
    q = torch.randn(1, seq_len, heads_q, head_dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(1, seq_len, heads_kv, head_dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(1, seq_len, heads_kv, head_dim, device=dev, dtype=dtype, generator=gen)
    backend = resolve_backend("auto", q, v)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    selection = select_blocks(q, k, config)
    row.select_ms = timed(lambda: select_blocks(q, k, config))
    row.attention_ms = timed(
        lambda sel=selection: ssa_attention(q, k, v, config=config, selection=sel, backend=backend)
    )
    # The forward as a caller runs it: one call that routes itself. (The attention phase above is given
    # the selection and checks it first, ~8 ms at 1M tokens, so the phases add up to a little more.)
    row.total_ms = timed(lambda: ssa_attention(q, k, v, config=config, backend=backend))
    if dev.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
    pairs = float(selection.num_selected_keys(seq_len, causal=True).double().sum()) * (heads_q // heads_kv)
    row.keys_per_query = pairs / (seq_len * heads_q)
    flops = 4.0 * pairs * head_dim
    row.sparse_tflops = flops / (row.attention_ms * 1e9)
    if backend == "triton":
        from subquad.ops.ssa.triton_attention import tokens_per_tile, use_routed_forward

        # Work a query-major tile does over the work its tokens chose (a property of the selection).
        row.tile_overhead = tile_overhead(selection.block_idx, tokens_per_tile(heads_q // heads_kv))
        routed = use_routed_forward(seq_len, selection.block_idx.shape[-1], selection.num_fixed_slots)
        row.forward_path = "routed key-major" if routed else "query-major"
        if not routed:
            row.executed_tflops = row.sparse_tflops * row.tile_overhead
    del selection

    full = dense_flops(seq_len, seq_len, heads_q, head_dim, causal=True)
    if seq_len <= dense_max_len:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kt = kt.repeat_interleave(heads_q // heads_kv, dim=1)
        vt = vt.repeat_interleave(heads_q // heads_kv, dim=1)
        names = ("flash", "cudnn") if dev.type == "cuda" else ("math",)
        for name in names:
            try:
                ms = timed(lambda name=name: _sdpa(name)(qt, kt, vt))
            except RuntimeError as exc:
                row.notes.append(f"sdpa {name} failed: {str(exc).splitlines()[0][:120]}")
                continue
            dense_rate[name] = full / (ms * 1e9)
            setattr(row, "flash_ms" if name in ("flash", "math") else "cudnn_ms", ms)
        if dev.type == "cuda" and seq_len <= backward_max_len:
            _measure_backward(row, q, k, v, qt, kt, vt, config, timed)
        del qt, kt, vt
    else:
        row.dense_extrapolated = True
        for name, attr in (("flash", "flash_ms"), ("math", "flash_ms"), ("cudnn", "cudnn_ms")):
            if name in dense_rate:
                setattr(row, attr, full / (dense_rate[name] * 1e9))
    if dev.type == "cuda" and seq_len <= flex_max_len:
        try:
            sel = select_blocks(q, k, config)
            fn = _flex_same_selection(*(t.transpose(1, 2) for t in (q, k, v)), sel)
            row.flex_ms = timed(fn)
        except Exception as exc:  # FlexAttention is optional: record why it did not run
            row.notes.append(f"flex failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    if row.flash_ms:
        row.speedup_vs_flash = row.flash_ms / row.total_ms
    if row.cudnn_ms:
        row.speedup_vs_cudnn = row.cudnn_ms / row.total_ms


def _measure_backward(row, q, k, v, qt, kt, vt, config, timed):
    # Both steps return dq, dk, dv (``autograd.grad``) rather than adding them into leaf ``.grad``
    # tensors: inside a model nothing accumulates there, and the adds are not the attention's work.
    grads = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def ssa_step():
        torch.autograd.grad(ssa_attention(*grads, config=config), grads, grad_out)

    dense = [t.detach().requires_grad_(True) for t in (qt, kt, vt)]
    grad_dense = grad_out.transpose(1, 2)

    def flash_step():
        torch.autograd.grad(_sdpa("flash")(*dense), dense, grad_dense)

    row.fwd_bwd_ms = timed(ssa_step)
    row.flash_fwd_bwd_ms = timed(flash_step)


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def _format_row(row: Row) -> str:
    dense = " (extrapolated)" if row.dense_extrapolated else ""
    return (
        f"{row.shape} N={row.seq_len} top_k={row.top_k} select={_fmt(row.select_ms)}ms "
        f"attn={_fmt(row.attention_ms)}ms total={_fmt(row.total_ms)}ms flash={_fmt(row.flash_ms)}ms"
        f" cudnn={_fmt(row.cudnn_ms)}ms{dense} x_flash={_fmt(row.speedup_vs_flash)} "
        f"x_cudnn={_fmt(row.speedup_vs_cudnn)} {' '.join(row.notes)}"
    )


def markdown_table(result: dict) -> str:
    env = result["environment"]
    where = env.get("gpu") or env.get("cpu")
    lines = [
        f"# SSA attention benchmark: {result['shape']}",
        "",
        f"{where}; torch {env['torch']}; triton {env['triton']}; {env['date']}",
        f"Command: `{env['command']}`",
        "",
        "| N | top_k | select ms | attention ms | total ms | SDPA flash ms | SDPA cuDNN ms | x flash "
        "| x cuDNN | sparse TFLOP/s | executed TFLOP/s | tile overhead | keys/query | peak GiB "
        "| fwd+bwd ms | flash fwd+bwd ms | flex ms | forward path |",
        "|" + "---|" * 18,
    ]
    for r in result["rows"]:
        star = "*" if r["dense_extrapolated"] else ""
        lines.append(
            f"| {r['seq_len']} | {r['top_k']} | {_fmt(r['select_ms'])} | {_fmt(r['attention_ms'])} "
            f"| {_fmt(r['total_ms'])} | {_fmt(r['flash_ms'])}{star} | {_fmt(r['cudnn_ms'])}{star} "
            f"| {_fmt(r['speedup_vs_flash'])} | {_fmt(r['speedup_vs_cudnn'])} | {_fmt(r['sparse_tflops'])} "
            f"| {_fmt(r['executed_tflops'])} | {_fmt(r['tile_overhead'], '.2f')} "
            f"| {_fmt(r['keys_per_query'], '.0f')} | {_fmt(r['peak_gib'], '.1f')} | {_fmt(r['fwd_bwd_ms'])} "
            f"| {_fmt(r['flash_fwd_bwd_ms'])} | {_fmt(r['flex_ms'])} | {r.get('forward_path') or '-'} |"
        )
    lines += [
        "",
        "`*` dense time extrapolated from the dense TFLOP/s measured at the longest length that ran.",
        "total: one `ssa_attention` call that routes itself; select and attention are timed apart (the",
        "attention is given the selection and checks it first), so they add up to a little more.",
    ]
    notes = [
        f"- N={r['seq_len']} top_k={r['top_k']}: {'; '.join(r['notes'])}"
        for r in result["rows"]
        if r["notes"]
    ]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def save_results(result: dict, out_dir: Path, tag: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{tag}.md").write_text(markdown_table(result))
    _plot(result, out_dir / f"{tag}.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for top_k in sorted({r["top_k"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["top_k"] == top_k and r["total_ms"]]
        if rows:
            ax.plot(
                [r["seq_len"] for r in rows], [r["total_ms"] for r in rows], "o-", label=f"SSA top_k={top_k}"
            )
    base = [r for r in result["rows"] if r["top_k"] == min(r["top_k"] for r in result["rows"])]
    for key, label in (("flash_ms", "SDPA flash (FA2)"), ("cudnn_ms", "SDPA cuDNN")):
        measured = [(r["seq_len"], r[key]) for r in base if r[key] and not r["dense_extrapolated"]]
        extrap = [(r["seq_len"], r[key]) for r in base if r[key] and r["dense_extrapolated"]]
        if measured:
            line = ax.plot(*zip(*measured), "s-", label=label)[0]
            if extrap:
                ax.plot(
                    *zip(*(measured[-1:] + extrap)), "--", color=line.get_color(), label=f"{label} (extrap.)"
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("forward time (ms)")
    env = result["environment"]
    ax.set_title(f"{result['shape']} causal forward, {env.get('gpu') or env.get('cpu')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_length(text: str) -> int:
    """``"16k"`` -> 16384, ``"1m"`` -> 1048576, ``"12m"`` -> 12582912, ``"1000"`` -> 1000."""
    value = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(value[-1:], 1)
    number = value[:-1] if scale > 1 else value
    try:
        result = float(number) * scale
    except ValueError:
        raise ValueError(f"length {text!r}: expected a number with an optional k/m suffix") from None
    if result < 1 or not math.isfinite(result):
        raise ValueError(f"length {text!r}: expected a positive length")
    return int(result)


def _routing_inputs(
    kind: str, seq_len: int, heads_q: int, heads_kv: int, dim: int, block_size: int, device, dtype, gen
):
    """q, k and the planted needle blocks (``[]`` for ``random``).

    ``random``: i.i.d. normal q, k (no structure: the hardest case for any index). ``needle``: the
    same, plus 8 blocks in the first three quarters whose keys carry a shared direction ``u`` (4x
    the per-component noise) that every query of the last quarter also carries: blocks a router
    must find among thousands of look-alikes.
    """
    q = torch.randn(1, seq_len, heads_q, dim, device=device, generator=gen)
    k = torch.randn(1, seq_len, heads_kv, dim, device=device, generator=gen)
    needles = []
    if kind == "needle":
        num_blocks = seq_len // block_size
        u = torch.randn(dim, device=device, generator=gen)
        u = u / u.norm()
        needles = (torch.randperm(num_blocks * 3 // 4 - 1, device=device, generator=gen)[:8] + 1).tolist()
        for blk in needles:
            k[0, blk * block_size : (blk + 1) * block_size] += 4.0 * u
        q[0, seq_len * 3 // 4 :] += u
    return q.to(dtype), k.to(dtype), needles


def _needle_hit_rate(selection, needles: list[int], seq_len: int) -> float:
    """Share of the planted blocks found by the queries of the last quarter."""
    idx = selection.block_idx[0, :, seq_len * 3 // 4 :].long()  # [Hkv, T/4, K]
    hits = sum((idx == blk).any(-1).float().mean() for blk in needles)
    return float(hits) / len(needles)


def run_routing_benchmark(
    lengths: list[int] | None = None,
    shape: str = "layer-8b",
    top_k: int = 16,
    device: str | None = None,
    reps: int = 3,
    flat_max_len: int = 1 << 21,
    out_dir: str | Path | None = "benchmarks/results",
    tag: str | None = None,
) -> dict:
    """Flat router vs the sub-linear indexes (``tree``, ``beam``): time, summary dot products per query,
    and agreement.

    Agreement is the share of the flat router's routed blocks that an index also picks, on i.i.d.
    random inputs and on inputs with planted needle blocks (see ``_routing_inputs``), where the needle
    hit rate of each router is reported too.
    """
    from subquad.ops.ssa.select import (
        beam_cost_per_query,
        beam_shape,
        routing_agreement,
        tree_cost_per_query,
        tree_shape,
    )

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heads_q, heads_kv, head_dim, _ = SHAPES[shape]
    lengths = lengths or (
        [1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22] if dev.type == "cuda" else [1024, 4096]
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    timed = median_timer(dev, 1, reps)
    rows = []
    for seq_len in lengths:
        gen = torch.Generator(device=dev).manual_seed(seq_len)
        flat = SSAConfig(top_k=top_k, index="flat")
        indexes = {name: SSAConfig(top_k=top_k, index=name) for name in _SUBLINEAR}
        num_blocks = -(-seq_len // flat.block_size)
        shapes = {"tree": tree_shape(num_blocks, indexes["tree"]), "beam": beam_shape(indexes["beam"])}
        costs = {"tree": tree_cost_per_query, "beam": beam_cost_per_query}
        row = {"seq_len": seq_len, "num_blocks": num_blocks, "flat_dots_per_query": num_blocks}
        for name, cfg in indexes.items():
            row[f"{name}_group"], row[f"{name}_probe"] = shapes[name]
            row[f"{name}_dots_per_query"] = costs[name](num_blocks, cfg)
        for kind in ("random", "needle"):
            q, k, needles = _routing_inputs(
                kind, seq_len, heads_q, heads_kv, head_dim, flat.block_size, dev, dtype, gen
            )
            selections = {}
            for name, cfg in [("flat", flat), *indexes.items()]:
                if name == "flat" and seq_len > flat_max_len:
                    continue
                row[f"{name}_ms_{kind}"] = timed(lambda q=q, k=k, cfg=cfg: select_blocks(q, k, cfg))
                selections[name] = select_blocks(q, k, cfg)
                if needles:
                    row[f"{name}_needle_hits"] = _needle_hit_rate(selections[name], needles, seq_len)
            if "flat" in selections:
                for name in indexes:
                    row[f"{name}_agreement_{kind}"] = routing_agreement(selections["flat"], selections[name])
            del q, k, selections
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"environment": _environment(dev), "shape": shape, "top_k": top_k, "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = tag or f"routing-{shape}-{dev.type}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(_routing_markdown(result))
    return result


def _routing_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Routing: flat router vs sub-linear indexes ({result['shape']}, top_k={result['top_k']})",
        "",
        f"{env.get('gpu') or env.get('cpu')}; torch {env['torch']}; triton {env['triton']}; {env['date']}",
        f"Command: `{env['command']}`",
        "",
        "| N | blocks | index | G / P | flat dots/query | index dots/query | flat ms | index ms "
        "| agreement (random) | agreement (needle) | needle hits flat | needle hits index |",
        "|" + "---|" * 12,
    ]
    for r in result["rows"]:
        for name in _SUBLINEAR:
            cells = [
                r["seq_len"],
                r["num_blocks"],
                name,
                f"{r[f'{name}_group']} / {r[f'{name}_probe']}",
                r["flat_dots_per_query"],
                r[f"{name}_dots_per_query"],
                _fmt(r.get("flat_ms_random")),
                _fmt(r.get(f"{name}_ms_random")),
                _fmt(r.get(f"{name}_agreement_random"), ".3f"),
                _fmt(r.get(f"{name}_agreement_needle"), ".3f"),
                _fmt(r.get("flat_needle_hits"), ".3f"),
                _fmt(r.get(f"{name}_needle_hits"), ".3f"),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Agreement: share of the flat router's routed blocks the index also picks. Needle hits: share of",
        "8 planted blocks (keys sharing a direction with the last quarter's queries) that those queries",
        "select. Random inputs have no structure, so no sub-linear index can agree with exact top-k there.",
        "G / P: tree: blocks per group / groups probed; beam: children per node / nodes kept per level.",
    ]
    return "\n".join(lines) + "\n"


# The indexes the routing benchmark compares with the flat router.
_SUBLINEAR = ("tree", "beam")
