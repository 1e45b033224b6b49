"""Kernels per graphed decode step of `small` (SSA, tree index) and its dense twin at 1M: count, GPU
time per kernel name (torch.profiler over 5 replayed steps) and wall ms per step (50 steps).
Run from the repo root: `PYTHONPATH=src python <this file>`; `PYTHONPATH=<a copy of the previous
commit's src>` gave the "old" rows of the logs."""

import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

torch.manual_seed(0)
for attention in ("ssa", "dense"):
    cfg = SubquadConfig.from_flavor(
        "small", attention=attention, position_scheme="rope", ssa={"index": "tree"}
    )
    model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    length = 1 << 20
    cache = subquad.SSACache(cfg, max_length=length + 256)
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(
            2, 1, length, cfg.num_key_value_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16
        )
        cache.layer(i).append(kv[0], kv[1])
        del kv
    decoder = GraphedDecoder(model, cache)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    for _ in range(3):
        decoder.step(token)
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.Counter()
    time_by_name = collections.Counter()
    for e in kernels:
        by_name[e.name[:60]] += 1
        time_by_name[e.name[:60]] += e.device_time
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        decoder.step(token)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 50 * 1e3
    gpu_ms = sum(time_by_name.values()) / steps / 1e3
    per_step = len(kernels) / steps
    print(
        f"{attention}: {per_step:.0f} kernels/step, GPU kernel time {gpu_ms:.3f} ms/step,",
        f"wall {wall:.3f} ms/step",
    )
    for name, n in by_name.most_common(30):
        print(f"   {n / steps:5.0f} x {time_by_name[name] / n:7.1f} us  {name}")
    del decoder, cache, model
    torch.cuda.empty_cache()
