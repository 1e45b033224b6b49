"""Subquad `small` (random weights): SSA vs the same model with dense SDPA attention, in one process.

Measures (issue 3):
* prefill time and peak memory of a whole prompt (chunked through an SSACache for SSA; one causal
  SDPA forward for dense) at 128K, 1M, 4M, 12M tokens;
* per-token decode latency at 32K .. 12M cached tokens (the cache is filled with random keys and
  values directly: decode cost does not depend on how the cache was filled); the dense twin decodes
  with SDPA over views of the same cache, its query heads grouped per KV head, on flash / efficient /
  math (``modeling.DENSE_DECODE_BACKENDS``): cuDNN, SDPA's first choice on H100/H200, builds an
  execution plan per key length, i.e. per step (``--dense-sdpa-auto`` adds rows with SDPA's choice);
* KV-cache bytes per token.

Dense runs only up to ``--dense-max-prefill`` / ``--dense-max-decode`` tokens (it is quadratic, or its
cache does not fit); out-of-memory is recorded, not fatal. Results go to ``benchmarks/results/`` as
JSON and markdown (GPU, torch, triton, date); a short table is printed last.

GPU (H200; each command stays under the 10-minute job limit):
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only decode
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only decode --dense-sdpa-auto \
        --decode-lengths 131072 1048576 4194304
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --prefill-lengths 131072 1048576
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --skip-dense \
        --prefill-lengths 4194304
    PYTHONPATH=src python benchmarks/decode.py --device cuda --only prefill --skip-dense \
        --prefill-lengths 12582912
CPU check (tiny model and lengths, seconds):
    python benchmarks/decode.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import subquad  # noqa: E402
from subquad.models import SubquadConfig, SubquadForCausalLM, prefill  # noqa: E402
from subquad.models.subquad import modeling  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K, M = 1 << 10, 1 << 20


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
    p.add_argument("--index", default="tree", choices=["flat", "tree"], help="SSA router")
    p.add_argument(
        "--position-scheme",
        default="rope",
        choices=["rope", "local_rope"],
        help="rope uses the Triton kernels; local_rope runs on the torch path",
    )
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--only", choices=["prefill", "decode"], default=None)
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument(
        "--dense-sdpa-auto",
        action="store_true",
        help="also decode with the dense twin on SDPA's own backend choice (cuDNN first on H100/H200, "
        "which builds a plan per key length); the dense rows use flash/efficient/math",
    )
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    quick = args.quick
    args.flavor = args.flavor or ("debug" if quick else "small")
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


def fill_cache(model, length, device) -> subquad.SSACache:
    """A cache holding ``length`` random keys/values per layer (appended in slices to bound temporaries)."""
    cfg = model.config
    cache = subquad.SSACache(cfg, max_length=length + 256)
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    timer = Timer(device)
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
                    cache = fill_cache(sparse, length, device)
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
                    row = dict(
                        kind="decode",
                        attention=name,
                        tokens=length,
                        kv_bytes_per_token=kv_only if name != "ssa" else cache.bytes_per_token(),
                    )
                    chosen = modeling.DENSE_DECODE_BACKENDS
                    if name == "dense-sdpa-auto":
                        modeling.DENSE_DECODE_BACKENDS = None
                    try:
                        row.update(run_decode(model, cache, args.decode_steps, device, timer))
                    except (RuntimeError, torch.OutOfMemoryError) as err:
                        if not is_oom(err):
                            raise
                        row["error"] = "OOM"
                    finally:
                        modeling.DENSE_DECODE_BACKENDS = chosen
                    rows.append(row)
                    _echo(row)
                del cache
                free(device)

    report = dict(env=env, rows=rows, summary=summarize(rows))
    write(report, Path(args.out), device)
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
    get = {(r["kind"], r["attention"], r["tokens"]): r for r in rows if "error" not in r}
    out = {}
    for length in sorted({r["tokens"] for r in rows}):
        s, d = get.get(("prefill", "ssa", length)), get.get(("prefill", "dense", length))
        if s and d:
            out[f"prefill_speedup_{length}"] = d["seconds"] / s["seconds"]
        s, d = get.get(("decode", "ssa", length)), get.get(("decode", "dense", length))
        if s and d:
            out[f"decode_speedup_{length}"] = d["ms_per_token"] / s["ms_per_token"]
        auto = get.get(("decode", "dense-sdpa-auto", length))
        if d and auto:
            out[f"dense_sdpa_auto_vs_dense_{length}"] = auto["ms_per_token"] / d["ms_per_token"]
    decode = sorted(
        (r["tokens"], r["ms_per_token"])
        for (kind, att, _), r in get.items()
        if kind == "decode" and att == "ssa"
    )
    if len(decode) >= 2:
        out["decode_latency_ratio_longest_vs_shortest"] = decode[-1][1] / decode[0][1]
    return out


def table(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# Subquad `{env['flavor']}` prefill/decode: {env['device']}, torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}",
        "",
        f"Command: `{env['command']}`  ",
        f"dtype {env['dtype']}, position scheme {env['position_scheme']}, SSA {env['ssa']}, "
        f"prefill chunk {env['prefill_chunk']}, {env['params_m']:.1f}M parameters",
        "",
        "| kind | attention | tokens | prefill s | peak GB | decode ms/token | KV bytes/token | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        cells = [
            _cell(r, "seconds", ".3f"),
            _cell(r, "peak_gb", ".2f"),
            _cell(r, "ms_per_token", ".3f"),
            _cell(r, "kv_bytes_per_token", ",.0f"),
        ]
        head = f"| {r['kind']} | {r['attention']} | {r['tokens']:,} | "
        lines.append(head + " | ".join(cells) + f" | {r.get('error', '')} |")
    if report["summary"]:
        lines += ["", "| ratio | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["summary"].items()]
    return "\n".join(lines)


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else ""


def write(report: dict, out_dir: Path, device: torch.device) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"decode-{device.type}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    base.with_suffix(".md").write_text(table(report) + "\n")
    print(f"wrote {base}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
