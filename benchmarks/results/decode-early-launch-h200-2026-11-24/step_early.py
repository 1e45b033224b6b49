"""A replayed decode step of `small` (SSA, tree index) at 1M with different sets of kernels letting the next
kernel launch before their own PDL wait (`subquad.ops.pdl.EARLY`), in one process: each set is captured
anew and timed in interleaved rounds (the step drifts ~0.01 ms over a process), and its logits at one
fixed position are compared with the first set's (they must be equal, bit for bit).

Sets are `name=kernel,kernel,...` (launch names of `pdl.launch_args`' callers; `name=` for none). The
tree step's chain per layer: norm_linear (q/k/v) -> tree_bounds -> tree_rescore -> split -> merge ->
linear_add (o) -> norm_linear (gate/up) -> swiglu_linear_add (down); the step ends with the final
norm_linear (lm_head).
Run from the repo root: `PYTHONPATH=src python <this file> --sets 'none=' 'A=norm_linear,...'`."""

import argparse
import statistics
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import pdl

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--index", default="tree", choices=["flat", "tree"])
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--sets", nargs="+", default=["none="])
args = parser.parse_args()
sets = {}
for spec in args.sets:
    name, _, kernels = spec.partition("=")
    sets[name] = frozenset(filter(None, kernels.split(",")))

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
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
base = args.length + 65  # a position inside the key block the warm-up ends in
with torch.no_grad():
    for _ in range(70):  # past a key-block boundary: a re-capture on the way
        decoder.step(token)


def whole_step_ms(steps=40, repeats=5):
    """Median ms per replayed step over `repeats` runs of `steps`, each from `base` (no re-capture)."""
    walls = []
    for _ in range(repeats):
        cache.crop(base - cache.get_seq_length())
        decoder.step(token)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(walls)


times = {name: [] for name in sets}
reference = None
with torch.no_grad():
    for r in range(args.rounds):
        for name, early in sets.items():
            pdl.EARLY = early
            decoder.invalidate()
            decoder.step(token)
            decoder.step(token)  # captured with these launches (a first capture may fall back to eager)
            cache.crop(base - cache.get_seq_length())
            logits = decoder.step(token).clone()
            if reference is None:
                reference = logits
            equal = torch.equal(logits, reference)
            times[name].append(whole_step_ms())
            print(
                f"round {r} {name:10s} {times[name][-1]:.4f} ms  logits equal to the first set: {equal}",
                flush=True,
            )
print(f"\nstep at {args.length} tokens, index {args.index}, median of {args.rounds} rounds (ms):")
for name, early in sets.items():
    print(
        f"  {name:10s} {statistics.median(times[name]):.4f}  [{', '.join(f'{t:.4f}' for t in times[name])}]"
        f"  early: {','.join(sorted(early)) or '-'}"
    )
