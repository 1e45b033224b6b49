"""The graphed decode step's 48 products of `small` (12 layers of q/k/v with the RMSNorm, o with the
residual, gate/up with the RMSNorm, down with SwiGLU and the residual) as one CUDA graph, PDL on, with one
product's GEMV launch shape changed at a time: rows a program (block_n) and warps, every weight loaded
before the PDL wait. `chain_floor.py` found an empty kernel of 1,408 programs costs 2.3 us a link against
0.5 for <= 132: fewer, wider programs than the shipped 1-warp ones. Weights from HBM (187 MB > L2).
Run from the repo root: `PYTHONPATH=src python <this file>`."""

import time

import torch
import triton

from subquad.models import SubquadConfig
from subquad.ops import fused, pdl

cfg = SubquadConfig.from_flavor("small")
dev, dt = "cuda", torch.bfloat16
C, inner, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
torch.manual_seed(0)


def weight(n, k):
    return (torch.randn(n, k, device=dev) / k**0.5).to(dt)


W = [dict(qkv=weight(qkv_out, C), o=weight(C, C), gate_up=weight(2 * inner, C), down=weight(C, inner))
     for _ in range(layers)]  # fmt: skip
norm = torch.ones(C, device=dev, dtype=dt)
residual = torch.randn(1, C, device=dev, dtype=dt) * 0.1
start = residual.clone()
attn_out = torch.randn(1, C, device=dev, dtype=dt) * 0.1
KIND = {(C, qkv_out): "qkv", (C, C): "o", (C, 2 * inner): "gate_up", (inner, C): "down"}


def products():
    residual.copy_(start)
    for w in W:
        fused.norm_linear(residual, norm, 1e-6, w["qkv"])
        fused.linear_add_(residual, attn_out, w["o"])
        gate_up = fused.norm_linear(residual, norm, 1e-6, w["gate_up"])
        fused.swiglu_linear_add_(residual, gate_up, w["down"])


shipped = fused._gemv
shapes: dict[str, tuple[int, int]] = {}


def gemv(x, norm_weight, weight, out, res, eps, prologue, n_in):
    kind = KIND[(n_in, weight.shape[0])]
    if kind not in shapes:
        return shipped(x, norm_weight, weight, out, res, eps, prologue, n_in)
    block_n, warps = shapes[kind]
    rows, n_out = x.shape[0], weight.shape[0]
    tiles = fused._prefetch_tiles(n_in, n_in)
    fused._gemv_kernel[(triton.cdiv(n_out, block_n), rows)](
        x, norm_weight if norm_weight is not None else weight, weight, out,
        res if res is not None else out, n_out,
        x.stride(0), weight.stride(0), out.stride(0), res.stride(0) if res is not None else 0,
        eps, N_IN=n_in, PROLOGUE=prologue, HAS_RES=res is not None, BLOCK_N=block_n,
        PRE0=tiles[0], PRE1=tiles[1], PRE2=tiles[2], BLOCK_K=16, num_warps=warps,
        **pdl.launch_args(x.device),
    )  # fmt: skip


def graph_ms(replays=100):
    products()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        products()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / replays * 1e3)
    return sorted(rounds)[2]


fused._gemv = gemv
with torch.no_grad():
    base = graph_ms()
    ref = residual.float().clone()
    print(f"shipped: {base:.4f} ms the 48 ({base * 1e3 / 48:.2f} us a product)")
    best = {}
    for kind, n_in in (("qkv", C), ("o", C), ("gate_up", C), ("down", inner)):
        for block_n, warps in ((4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8), (32, 16), (64, 16)):
            if block_n * n_in // (32 * warps) > 192:  # weights a thread: keep under ~96 registers
                continue
            shapes.clear()
            shapes[kind] = (block_n, warps)
            ms = graph_ms()
            err = (residual.float() - ref).abs().max().item()
            saved = (base - ms) * 1e3 / 12
            print(
                f"{kind:8s} block_n {block_n:3d} warps {warps:2d}: {ms:.4f} ms the 48, {saved:+.2f} us a "
                f"product vs shipped (|diff| {err:.2g})"
            )
            if saved > best.get(kind, (0.0, None))[0]:
                best[kind] = (saved, (block_n, warps))
    shapes.clear()
    shapes.update({kind: shape for kind, (_, shape) in best.items()})
    ms = graph_ms()
    print(f"best of each {shapes}: {ms:.4f} ms the 48 ({ms * 1e3 / 48:.2f} us a product), shipped {base:.4f}")
fused._gemv = shipped
