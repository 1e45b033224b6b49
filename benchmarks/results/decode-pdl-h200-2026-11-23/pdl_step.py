"""The graphed decode step of `small` (SSA, tree index) at 1M with and without programmatic dependent
launch, in one process: the same logits bit for bit, then wall ms per replayed step (alternating rounds)
and GPU time per kernel name (torch.profiler over 5 steps).
Run from the repo root: `PYTHONPATH=src python <this file>`. With an older `src` (no subquad.ops.pdl) on
PYTHONPATH it times that tree alone ("old")."""

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

try:
    from subquad.ops import pdl
except ImportError:
    pdl = None

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--attention", default="ssa")
parser.add_argument("--rounds", type=int, default=4)
args = parser.parse_args()
modes = ["old"] if pdl is None else ["off", "on", "early"] if hasattr(pdl, "EARLY_TRIGGER") else ["off", "on"]

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor(
    "small", attention=args.attention, position_scheme="rope", ssa={"index": "tree"}
)
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()


def filled_cache():
    gen = torch.Generator(device="cuda").manual_seed(1)
    cache = subquad.SSACache(cfg, max_length=args.length + 512)
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(
            2,
            1,
            args.length,
            cfg.num_key_value_heads,
            cfg.head_dim,
            device="cuda",
            dtype=torch.bfloat16,
            generator=gen,
        )
        cache.layer(i).append(kv[0], kv[1])
        del kv
    return cache


def use(mode):
    if pdl is not None:
        pdl.ENABLED = mode != "off"
        if hasattr(pdl, "EARLY_TRIGGER"):
            pdl.EARLY_TRIGGER = mode == "early"


caches = {mode: filled_cache() for mode in modes}
decoders = {mode: GraphedDecoder(model, caches[mode]) for mode in modes}

# Same tokens through each decoder over 80 steps (one key-block boundary: a re-capture on the way).
tokens = torch.randint(0, cfg.vocab_size, (80, 1, 1), device="cuda")
logits = collections.defaultdict(list)
for mode in modes:
    use(mode)
    for tok in tokens:
        logits[mode].append(decoders[mode].step(tok).float().cpu())
for mode in modes[1:]:
    diffs = [(a - b).abs().max().item() for a, b in zip(logits[modes[0]], logits[mode])]
    print(
        f"logits {mode} vs {modes[0]} over {len(diffs)} steps: max |diff| {max(diffs):.3g}, "
        f"steps differing {sum(d > 0 for d in diffs)}"
    )

# Timing: each round rewinds to the same key block (no re-capture inside the timed steps).
steps = 40
# The 80 steps ended in the key block after the prompt's last; each round goes back to its second slot.
base = args.length + 65


def rewind(mode):
    caches[mode].crop(base - caches[mode].get_seq_length())
    decoders[mode].step(token)  # replays at the new position: no re-capture


walls, hosts = collections.defaultdict(list), collections.defaultdict(list)
token = tokens[0]
for _ in range(args.rounds):
    for mode in modes:
        use(mode)
        rewind(mode)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoders[mode].step(token)
        hosts[mode].append((time.perf_counter() - t0) / steps * 1e3)  # the host's share, before the sync
        torch.cuda.synchronize()
        walls[mode].append((time.perf_counter() - t0) / steps * 1e3)
for mode in modes:
    print(
        f"{args.attention} {mode}: wall ms/step per round {' '.join(f'{w:.3f}' for w in walls[mode])}, "
        f"median {statistics.median(walls[mode]):.3f}; host ms/step (step() calls, no sync) "
        f"median {statistics.median(hosts[mode]):.3f}"
    )

for mode in modes:
    use(mode)
    rewind(mode)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            decoders[mode].step(token)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    count, total = collections.Counter(), collections.Counter()
    for e in kernels:
        count[e.name[:60]] += 1
        total[e.name[:60]] += e.device_time
    print(
        f"{mode}: {len(kernels) / 5:.0f} kernels/step,",
        f"summed kernel time {sum(total.values()) / 5e3:.3f} ms/step",
    )
    for name, n in count.most_common(14):
        print(f"   {n / 5:5.0f} x {total[name] / n:7.2f} us  {name}")
