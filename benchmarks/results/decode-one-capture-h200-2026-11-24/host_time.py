"""Where the host's time goes in graphed decoding of `small` (SSA, tree index) at `--length` keys of random
cache: host ms per replayed step (no sync), per `graph.replay()` alone, per prepare step (capture), with
cProfile's top entries for each; then ms per token over 2 key blocks back to back, started at offsets
0 and 32 of a key block (as decode.py's run, one sync at the end, re-captures counted), and the
replayed step's GPU ms.
Run from the repo root: `PYTHONPATH=src python <this file>`."""

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--top", type=int, default=25)
args = parser.parse_args()


def top(profiler, n=args.top):
    s = io.StringIO()
    pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(n)
    return "\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip())


torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": "tree"})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 2048)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda", generator=gen)
bs = cfg.ssa_config.block_size
with torch.no_grad():
    for _ in range(2 * bs + 5):  # two re-captures on the way: every kernel variant compiled
        decoder.step(token)
    torch.cuda.synchronize()
    # The replayed step's GPU time (40 back to back, inside one block).
    cache.crop(args.length + 2 * bs + 1 - cache.get_seq_length())
    decoder.step(token)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40):
        decoder.step(token)
    torch.cuda.synchronize()
    print(f"GPU: replayed step {(time.perf_counter() - t0) / 40 * 1e3:.4f} ms (40 back to back)")

    # Host time of a replayed step: 30 steps, no sync (the queue absorbs them).
    host = []
    for _ in range(30):
        t0 = time.perf_counter()
        decoder.step(token)
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    print(
        f"host: replayed step median {statistics.median(host) * 1e6:.1f} us "
        f"(min {min(host) * 1e6:.1f}, max {max(host) * 1e6:.1f})"
    )
    graph = decoder._pieces[0][0]
    reps = []
    for _ in range(30):
        t0 = time.perf_counter()
        graph.replay()
        reps.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    print(f"host: graph.replay() alone median {statistics.median(reps) * 1e6:.1f} us")
    cache.crop(args.length + 2 * bs + 20 - cache.get_seq_length())
    decoder.step(token)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(30):
        decoder.step(token)
    prof.disable()
    torch.cuda.synchronize()
    print("cProfile, 30 replayed steps:\n" + top(prof))

    # A prepare step (re-capture): host time, and its profile.
    caps = []
    for _ in range(3):
        decoder.invalidate()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decoder.step(token)
        caps.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    print(
        f"host: prepare step {[round(c * 1e3, 2) for c in caps]} ms, capture alone "
        f"{decoder.capture_seconds * 1e3:.2f} ms"
    )
    decoder.invalidate()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    decoder.step(token)
    prof.disable()
    torch.cuda.synchronize()
    print("cProfile, one prepare step:\n" + top(prof, 40))

    # ms per token over 2 key blocks, as decode.py's run, starting at offsets 0 and 32 of a block.
    for offset in (0, 32):
        while cache.get_seq_length() % bs != offset:
            decoder.step(token)
        torch.cuda.synchronize()
        before = decoder.captures
        t0 = time.perf_counter()
        for _ in range(2 * bs):
            decoder.step(token)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / (2 * bs) * 1e3
        print(
            f"run of {2 * bs} steps from offset {offset}: {ms:.4f} ms/token, "
            f"{decoder.captures - before} captures"
        )
