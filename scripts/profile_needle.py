"""Where a long needle prompt's time goes, phase by phase, as `subquad eval` runs it.

For each length: build the RULER prompt (sample 0 of ``--task``), tokenize it, prefill it (``generate``
with one new token, the runner's path), generate ``--new-tokens`` tokens, and prefill it again (no
compiles left to pay). ``decode_ms_per_token``: a second generation less that warm prefill, per step
after the first (fewer steps run if the model ends its answer sooner). Options, each on one more prefill:
``--profile`` groups its CUDA kernels as ``profile_prefill.py`` does (routing, attention, matmuls, the
rest); ``--host N`` lists the N operators that hold the host longest; ``--syncs N`` lists the N lines
of subquad's code where it made the host wait for the GPU (torch's sync debug mode), with counts. Every
phase is timed after a CUDA synchronize. The first length pays the warm-up (Triton compiles): put a
short one first.

GPU:  PYTHONPATH=src python scripts/profile_needle.py --lengths 32k,1m,2m --profile
"""

import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import subquad
from subquad._args import key_values
from subquad.benchmark import parse_length
from subquad.eval import ruler
from subquad.eval._core import encode, postprocess_prediction
from subquad.eval.runner import _greedy_generate, load_model
from subquad.models.prefill import prefill_progress

sys.path.insert(0, str(Path(__file__).parent))
from profile_prefill import group_of, kernel_times  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "src/subquad/assets/subquad-nano"


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def kernel_groups(run) -> dict[str, float]:
    """GPU seconds of ``run()``'s CUDA kernels by group, and their launch count."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels, calls = kernel_times(prof)
    groups: collections.Counter = collections.Counter()
    for name, us in kernels.items():
        groups[group_of(name)] += us / 1e6
    return {**{g: round(s, 3) for g, s in groups.most_common()}, "launches": sum(calls.values())}


def host_ops(run, top: int) -> list:
    """The ``top`` operators of ``run()`` by host time spent in them alone (self CPU time): Python-side
    launches, and waits for the GPU (a sync shows as time in ``cudaStreamSynchronize`` or a copy)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key[:60], round(e.self_cpu_time_total / 1e6, 3), e.count] for e in rows[:top]]


def sync_sites(run, top: int) -> list:
    """The ``top`` lines of subquad's code where ``run()`` synchronizes with the GPU, with counts.

    torch's sync debug mode warns at each call that waits for the device (``.item()``, ``nonzero``,
    ``bool(tensor)``, copies to the host); each warning is charged to the innermost frame in the package.
    """
    package = str(Path(subquad.__file__).parent)
    sites: collections.Counter = collections.Counter()

    def record(*_args, **_kwargs):
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(package)]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "outside"
        sites[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [[where, n] for where, n in sites.most_common(top)] + [["total", sum(sites.values())]]


def measure(model, tokenizer, device, length: int, args) -> dict:
    """One row: the phases of sample 0 at ``length``."""
    sample, build_s = timed(lambda: next(ruler.iter_samples(args.task, length, tokenizer, 0)), device)
    ids, encode_s = timed(lambda: encode(tokenizer, sample.input), device)
    _, prefill_s = timed(lambda: _greedy_generate(model, tokenizer, [ids], 1), device)
    out, generate_s = timed(lambda: _greedy_generate(model, tokenizer, [ids], args.new_tokens), device)
    _, warm_s = timed(lambda: _greedy_generate(model, tokenizer, [ids], 1), device)
    _, again_s = timed(lambda: _greedy_generate(model, tokenizer, [ids], args.new_tokens), device)
    row = {
        "length": length,
        "tokens": len(ids),
        "build_s": round(build_s, 2),
        "encode_s": round(encode_s, 2),
        "prefill_s": round(prefill_s, 2),
        f"generate_{args.new_tokens}_s": round(generate_s, 2),
        "prefill_again_s": round(warm_s, 2),
        "decode_ms_per_token": round((again_s - warm_s) / max(1, args.new_tokens - 1) * 1e3, 1),
        "found": ruler.score(args.task, postprocess_prediction(out[0]), sample.answers) == 1.0,
    }
    if args.profile and device.type == "cuda":
        row["prefill_kernels_s"] = kernel_groups(lambda: _greedy_generate(model, tokenizer, [ids], 1))
    if args.host and device.type == "cuda":
        row["prefill_host_top"] = host_ops(lambda: _greedy_generate(model, tokenizer, [ids], 1), args.host)
    if args.syncs and device.type == "cuda":
        row["prefill_syncs"] = sync_sites(lambda: _greedy_generate(model, tokenizer, [ids], 1), args.syncs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--lengths", default="32k,1m,2m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ssa", default=None, help="SSA settings replacing the model's (as `subquad eval`)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="kernel groups of one more prefill")
    parser.add_argument("--host", type=int, default=0, help="top host operators of one more prefill")
    parser.add_argument("--syncs", type=int, default=0, help="top host-sync sites of one more prefill")
    parser.add_argument("--out", default=None, help="append one JSON line per length here")
    args = parser.parse_args()
    ssa = key_values(args.ssa) if args.ssa else None
    model, tokenizer = load_model(args.model, device=args.device, ssa=ssa)
    device = next(model.parameters()).device
    for text in args.lengths.split(","):
        with prefill_progress(False):
            row = measure(model, tokenizer, device, parse_length(text), args)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as sink:
                sink.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
