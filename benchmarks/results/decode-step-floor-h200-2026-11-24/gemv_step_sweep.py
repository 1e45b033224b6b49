"""The whole replayed decode step of `small` (SSA, tree index) at 1M with the four products' GEMV launch
shapes (rows a program, warps) varied, all weights loaded before the PDL wait: the chain, not each product
alone (`gemv_shapes.py`), decides. Each variant is re-captured, then timed as `step_parts.py` times a step.
Run from the repo root: `PYTHONPATH=src python <this file>`."""

import time

import torch
import triton

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM
from subquad.ops import fused, pdl

LENGTH = 1 << 20
torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": "tree"})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=LENGTH + 512)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, LENGTH, cfg.num_key_value_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16,
                     generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
for _ in range(70):
    decoder.step(token)

C, inner = cfg.hidden_size, cfg.intermediate_size
qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
KIND = {(C, qkv_out): "qkv", (C, C): "o", (C, 2 * inner): "gate_up", (inner, C): "down"}
shipped = fused._gemv
shapes: dict[str, tuple[int, int]] = {}


def gemv(x, norm_weight, weight, out, res, eps, prologue, n_in):
    kind = KIND.get((n_in, weight.shape[0]))
    if kind not in shapes:
        return shipped(x, norm_weight, weight, out, res, eps, prologue, n_in)
    block_n, warps = shapes[kind]
    tiles = fused._prefetch_tiles(n_in, n_in)
    fused._gemv_kernel[(triton.cdiv(weight.shape[0], block_n), x.shape[0])](
        x, norm_weight if norm_weight is not None else weight, weight, out,
        res if res is not None else out, weight.shape[0],
        x.stride(0), weight.stride(0), out.stride(0), res.stride(0) if res is not None else 0,
        eps, N_IN=n_in, PROLOGUE=prologue, HAS_RES=res is not None, BLOCK_N=block_n,
        PRE0=tiles[0], PRE1=tiles[1], PRE2=tiles[2], BLOCK_K=16, num_warps=warps,
        **pdl.launch_args(x.device),
    )  # fmt: skip


def whole_step_ms(rounds=5, steps=40):
    base = LENGTH + 65
    walls = []
    for _ in range(rounds):
        cache.crop(base - cache.get_seq_length())
        decoder.step(token)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / steps * 1e3)
    return sorted(walls)[rounds // 2]


variants = {
    "shipped": {},
    "o 4x1": {"o": (4, 1)},
    "o 4x2": {"o": (4, 2)},
    "qkv 8x1": {"qkv": (8, 1)},
    "qkv 8x2": {"qkv": (8, 2)},
    "gate_up 8x1": {"gate_up": (8, 1)},
    "gate_up 8x2": {"gate_up": (8, 2)},
    "down 8x4": {"down": (8, 4)},
    "down 4x4": {"down": (4, 4)},
    "shipped again": {},
}
fused._gemv = gemv
with torch.no_grad():
    for name, shape in variants.items():
        shapes.clear()
        shapes.update(shape)
        decoder.invalidate()
        decoder.step(token)  # compiles the shape, then captures
        print(f"{name:16s} {whole_step_ms():.4f} ms a step", flush=True)
fused._gemv = shipped
