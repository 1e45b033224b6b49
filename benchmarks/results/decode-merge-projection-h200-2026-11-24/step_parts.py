"""Where a replayed decode step of `small` (SSA, `--index` flat or tree) at 1M spends its time: the whole
graphed step, then graphs of its parts alone, each replayed on its own: the products (q/k/v, o
and the one-kernel MLP of 12 layers), the attention (rotation + cache append, routing, split-K attention
and merge of 12 layers: `fused_decode_step`), and the rest (embedding, final norm, lm_head, the
position updates). Runs with `one-kernel-mlp.patch` applied (call 3 of this directory's README);
`--mlp` picks the one-kernel MLP's launch shape.
Parts overlap inside the step (PDL), so their sum may exceed the whole. `--sweep`: the whole step for
other flat-routing launch shapes. Then the kernels per step and their GPU time (PDL off).
Run from the repo root: `PYTHONPATH=src python <this file>` (`--step-only`: the whole step and the
profile)."""

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import fused, pdl
from subquad.ops.ssa import triton_decode, triton_select

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--replays", type=int, default=200)
parser.add_argument("--step-only", action="store_true", help="the whole step and its profile, no parts")
parser.add_argument("--index", default="flat", choices=["flat", "tree"])
parser.add_argument("--sweep", action="store_true", help="launch shapes of the routing kernels")
parser.add_argument("--mlp", default=None, help="'units,warps': fused.MLP_UNITS, MLP_WARPS")
args = parser.parse_args()
if args.mlp:
    fused.MLP_UNITS, fused.MLP_WARPS = (int(n) for n in args.mlp.split(","))

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": args.index})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
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
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
for _ in range(70):  # past a key-block boundary: a re-capture on the way
    decoder.step(token)


def timed(fn, replays=args.replays):
    """ms per call of fn (a graph replay), median of 5 rounds."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / replays * 1e3)
    return sorted(rounds)[2]


def graphed(body):
    """body captured in a CUDA graph (after one eager warm-up run), as a replay function."""
    body()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        body()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


core = model.model
weights = decoder._weights
residual = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.1
attn_out = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.1
start = residual.clone()


pending = torch.zeros(1, cfg.hidden_size, device="cuda", dtype=torch.int64)


def products():
    residual.copy_(start)  # bounded values whatever the weights
    for i, layer in enumerate(core.layers):
        norm, post = layer.input_layernorm, layer.post_attention_layernorm
        fused.norm_linear(residual, norm.weight, norm.eps, weights.qkv[i], pending)
        fused.linear_add_(residual, attn_out, layer.self_attn.o_proj.weight, pending)
        fused.norm_swiglu_accumulate_(pending, residual, post.weight, post.eps, weights.gate_up[i],
                                      layer.mlp.down_proj.weight)  # fmt: skip
    fused.resolve_pending_(residual, pending)


heads_q, heads_kv = cfg.num_attention_heads, cfg.num_key_value_heads
qkv = torch.randn(1, 1, heads_q + 2 * heads_kv, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
pos = decoder._pos.clone()  # the next token's position: the attention part rewrites that slot
held = decoder._held


def attention():
    for layer, cache_layer in zip(core.layers, cache.layers):
        layer.self_attn._decode_from_projection(qkv, decoder._rope, pos, decoder._plan, cache_layer)


hidden = torch.randn(1, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)


def rest():
    core.embed_tokens(decoder._ids)
    model.lm_head(core.norm(hidden))
    pos.add_(0)
    decoder._seqlens.add_(0)


def whole_step_ms(rounds=5, steps=40):
    """ms per replayed step: each round rewinds to the same key block (no re-capture while timed)."""
    base = args.length + 65  # the warm-up ended in the key block after the prompt's last
    walls = []
    for _ in range(rounds):
        cache.crop(base - cache.get_seq_length())
        decoder.step(token)  # a replay at the new position
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / steps * 1e3)
    return sorted(walls)[rounds // 2]


with torch.no_grad():
    print(f"whole step (GraphedDecoder.step, PDL on): {whole_step_ms():.3f} ms")
    if not args.step_only:
        parts = {"products (36)": products, "attention (12 layers)": attention, "rest": rest}
        part_ms = {name: timed(graphed(body)) for name, body in parts.items()}
        for name, ms in part_ms.items():
            print(f"  {name:24s} {ms:.3f} ms alone")
        print(f"  sum of parts             {sum(part_ms.values()):.3f} ms")
    if args.sweep and args.index == "flat":
        default = triton_decode._FLAT_MAX_LISTS, triton_decode._FLAT_TILE_ELEMENTS
        shapes = [(128, 16384), (64, 32768), (32, 32768), (128, 8192), (32, 16384), default]
        for lists, tile_elements in shapes:
            triton_decode._FLAT_MAX_LISTS, triton_decode._FLAT_TILE_ELEMENTS = lists, tile_elements
            decoder.invalidate()
            decoder.step(token)  # compiles what the launch shape needs, then captures
            print(f"  flat routing, lists <= {lists}, tile of {tile_elements}: {whole_step_ms():.3f} ms")
    if args.sweep and args.index == "tree":
        default = triton_select._DECODE_MAX_SPLITS
        for splits in (16, 8, 4, default):
            triton_select._DECODE_MAX_SPLITS = splits
            decoder.invalidate()
            decoder.step(token)
            print(f"  tree routing, bounds in <= {splits} lists: {whole_step_ms():.3f} ms")

pdl.ENABLED = False
decoder.invalidate()
with torch.no_grad():
    decoder.step(token)
    decoder.step(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            decoder.step(token)
        torch.cuda.synchronize()
kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
count, total = collections.Counter(), collections.Counter()
for e in kernels:
    count[e.name[:60]] += 1
    total[e.name[:60]] += e.device_time
print(
    f"PDL off: {len(kernels) / 5:.0f} kernels/step,",
    f"summed kernel time {sum(total.values()) / 5e3:.3f} ms/step",
)
for name, n in count.most_common(16):
    print(f"   {n / 5:5.0f} x {total[name] / n:7.2f} us  {name}")
