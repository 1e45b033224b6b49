"""Where the graphed decode of `small` loses time over 2 key blocks back to back (as `benchmarks/decode.py
--graph`'s "ms/token, 2 blocks" column, re-captures included) against a replayed step: an event after
each step gives the GPU time between steps, host timestamps the host time of each step. Steps that open
a key block (re-capture) are listed with both. Run from the repo root: `PYTHONPATH=src python <this
file> [--length N]`."""

import argparse
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--index", default="tree", choices=["flat", "tree"])
args = parser.parse_args()

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": args.index})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 1024)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
run = 2 * cfg.ssa_config.block_size
with torch.no_grad():
    for _ in range(run + 3):  # compile and capture what new block counts need, as decode.py does
        decoder.step(token)
    for label in ("first", "second"):
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(run + 1)]
        host = []
        events[0].record()
        t_start = time.perf_counter()
        captures = decoder.captures
        for i in range(run):
            t0 = time.perf_counter()
            decoder.step(token)
            events[i + 1].record()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t_start) * 1e3
        gpu = [events[i].elapsed_time(events[i + 1]) for i in range(run)]
        big = sorted(range(run), key=lambda i: -gpu[i])[:4]
        new = decoder.captures - captures
        print(f"{label} run at {args.length:,}: {wall / run:.3f} ms/token wall, {new} captures")
        print(f"   GPU between steps: median {sorted(gpu)[run // 2]:.3f} ms, sum {sum(gpu):.2f} ms")
        print(f"   host per step: median {sorted(host)[run // 2]:.3f} ms, sum {sum(host):.2f} ms")
        for i in sorted(big):
            print(f"   step {i:3d}: GPU {gpu[i]:.3f} ms, host {host[i]:.3f} ms")
