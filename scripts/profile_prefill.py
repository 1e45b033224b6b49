"""Where one chunk of a long `small` prefill spends its GPU time (torch profiler, per kernel).

Fills an ``SSACache`` with ``--context`` random keys/values per layer (no prefill: seconds, not
minutes, at 12M), then runs ``--chunk`` more tokens through the model once to warm up and once under
the profiler, and prints the kernels by GPU time, grouped (routing, attention, matmuls, the rest).
A mid-prompt chunk costs about what the whole prefill's average chunk does at twice its context.

GPU:  PYTHONPATH=src python scripts/profile_prefill.py --context 6m --chunk 64k
"""

import argparse
import collections
import re

import torch

import subquad
from subquad.benchmark import parse_length
from subquad.models import SubquadConfig, SubquadForCausalLM

# Kernel name pattern -> group (first match wins).
GROUPS = (
    ("routing", r"threshold|top_groups|rescore|group_max"),
    ("attention", r"routed|merge_partials|sparse_attention"),
    ("matmul", r"gemm|cutlass|sm90|nvjet|xmma|matmul"),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def kernel_times(prof) -> tuple[collections.Counter, collections.Counter]:
    """GPU microseconds and launches of each CUDA kernel a ``torch.profiler`` run recorded, by name."""
    kernels, calls = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time_total
            calls[event.name] += 1
    return kernels, calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", default="6m", help="tokens already in the cache")
    parser.add_argument("--chunk", default="64k", help="tokens of the profiled chunk")
    parser.add_argument("--index", default="flat", choices=["flat", "tree"])
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    args = parser.parse_args()
    context, chunk = parse_length(args.context), parse_length(args.chunk)
    device = torch.device("cuda")
    cfg = SubquadConfig.from_flavor("small", ssa={"index": args.index}, prefill_chunk_tokens=chunk)
    torch.manual_seed(0)
    model = SubquadForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    cache = subquad.SSACache(cfg, max_length=context + 2 * chunk + 64)
    step = 1 << 20
    for i in range(cfg.num_hidden_layers):
        layer = cache.layer(i)
        for start in range(0, context, step):
            n = min(step, context - start)
            kv = torch.randn(
                2, 1, n, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=torch.bfloat16
            )
            layer.append(kv[0], kv[1])
    ids = torch.randint(0, cfg.vocab_size, (1, chunk), device=device)

    def run():
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()

    run()  # compiles, allocations
    cache.crop(-chunk)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    stop.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(stop)
    cache.crop(-chunk)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    kernels, calls = kernel_times(prof)
    total_us = sum(kernels.values())
    print(
        f"small, index {args.index}: {chunk} tokens after {context}: {wall_ms:.1f} ms wall (CUDA events), "
        f"{total_us / 1e3:.1f} ms of kernels, {sum(calls.values())} launches"
    )
    groups = collections.Counter()
    for name, us in kernels.items():
        groups[group_of(name)] += us
    for group, us in groups.most_common():
        print(f"  {group:10s} {us / 1e3:9.2f} ms  {100 * us / total_us:5.1f}%")
    print(f"\n{'ms':>9s} {'calls':>6s}  kernel")
    for name, us in kernels.most_common(args.top):
        print(f"{us / 1e3:9.2f} {calls[name]:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
