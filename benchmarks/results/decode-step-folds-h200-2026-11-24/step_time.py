"""A replayed decode step of `small` (SSA, tree index by default) at `--length` keys of random cache: ms per
step (median of `--repeats` runs of 40 steps, each started from the same position), the logits at that
position saved to `--logits` (to compare two versions of `src` bit for bit), and with `--profile` the
kernels of a step and their mean GPU time with PDL off (one launch at a time, so each is timed alone).
Run from the repo root: `PYTHONPATH=src python <this file> [--profile] [--logits FILE]`."""

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.models.subquad import graphed
from subquad.ops import pdl

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--index", default="tree", choices=["flat", "tree"])
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--profile", action="store_true")
parser.add_argument("--logits", default=None, help="save the logits at the fixed position here (torch.save)")
parser.add_argument(
    "--head-prefetch-mb",
    type=int,
    default=None,
    help="graphed.HEAD_PREFETCH_BYTES in MiB (versions of src that have it)",
)
parser.add_argument(
    "--no-prefetch",
    action="store_true",
    help="no product asks L2 for later weights (versions of src that have _prefetch_targets)",
)
args = parser.parse_args()

if args.no_prefetch:
    graphed.GraphedDecoder._prefetch_targets = lambda self: [(None,) * 4] * len(self.model.model.layers)
if args.head_prefetch_mb is not None:
    graphed.HEAD_PREFETCH_BYTES = args.head_prefetch_mb << 20
torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": args.index})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 512)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda", generator=gen)
base = args.length + 65  # a position inside the key block the warm-up ends in
with torch.no_grad():
    for _ in range(70):  # past a key-block boundary: a re-capture on the way
        decoder.step(token)

    walls = []
    for _ in range(args.repeats):
        cache.crop(base - cache.get_seq_length())
        logits = decoder.step(token).clone()  # the crop makes this step prepare and capture again
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / 40 * 1e3)
    print(
        f"step at {args.length} keys, index {args.index}: {statistics.median(walls):.4f} ms "
        f"[{', '.join(f'{w:.4f}' for w in walls)}]",
        flush=True,
    )
    if args.logits:
        torch.save(logits.float().cpu(), args.logits)

    if args.profile:
        pdl.ENABLED = False
        decoder.invalidate()
        for _ in range(3):
            decoder.step(token)
        torch.cuda.synchronize()
        steps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder.step(token)
            torch.cuda.synchronize()
        kernels = collections.defaultdict(list)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.name[:60]].append(event.device_time)
        total = sum(sum(t) for t in kernels.values())
        count = sum(len(t) for t in kernels.values())
        print(f"PDL off: {count / steps:.0f} kernels a step, GPU time {total / steps / 1e3:.3f} ms a step")
        for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {len(times) / steps:5.1f} x {statistics.mean(times):6.2f} us  {name}")
