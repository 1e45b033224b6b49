"""Is streaming the weights from HBM on the decode step's critical path? A replayed step of `small` (SSA,
tree, random cache of `--length` keys) with its own weights, then with every layer reading layer 0's
weights (16 MB, which L2 can keep between layers), then the final norm + lm_head GEMV alone (49 MB;
two copies alternated so L2 cannot keep it) against a head of 4,096 rows.
Run from the repo root: `PYTHONPATH=src python <this file>`."""

import argparse
import statistics
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import fused

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
args = parser.parse_args()

torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": "tree"})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 512)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda", generator=gen)
base = args.length + 65


def step_ms(decoder, repeats=5):
    walls = []
    for _ in range(repeats):
        cache.crop(base - cache.get_seq_length())
        decoder.step(token)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / 40 * 1e3)
    return statistics.median(walls)


with torch.no_grad():
    own = GraphedDecoder(model, cache)
    for _ in range(70):
        own.step(token)
    shared = GraphedDecoder(model, cache)
    layers = model.model.layers
    shared._weights.qkv = [shared._weights.qkv[0]] * len(layers)
    shared._weights.gate_up = [shared._weights.gate_up[0]] * len(layers)
    saved = [(layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight) for layer in layers]
    for layer in layers[1:]:
        layer.self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight
        layer.mlp.down_proj.weight = layers[0].mlp.down_proj.weight
    shared.step(token)
    for r in range(3):
        for name, decoder in (("own weights", own), ("layer 0's weights everywhere", shared)):
            if name == "own weights":
                for layer, (o, down) in zip(layers, saved):
                    layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight = o, down
            else:
                for layer in layers[1:]:
                    layer.self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight
                    layer.mlp.down_proj.weight = layers[0].mlp.down_proj.weight
            decoder.invalidate()
            decoder.step(token)
            print(f"round {r} {name:30s} {step_ms(decoder):.4f} ms a step", flush=True)

    residual = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    norm = model.model.norm
    heads = [model.lm_head.weight, model.lm_head.weight.clone()]
    small_head = model.lm_head.weight[:4096].contiguous()
    for name, weights in (("lm_head 49 MB, 2 copies", heads), ("head of 4096 rows", [small_head])):
        for _ in range(5):
            fused.norm_linear(residual, norm.weight, norm.eps, weights[0])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(200):
            fused.norm_linear(residual, norm.weight, norm.eps, weights[i % len(weights)])
        end.record()
        torch.cuda.synchronize()
        print(f"{name:30s} {start.elapsed_time(end) / 200 * 1e3:.2f} us a call (back to back, PDL)")
