"""The graphed decode step's 48 products of `small` (q/k/v with the RMSNorm, o with the residual,
gate/up with the RMSNorm, down with SwiGLU and the residual, 12 layers) as one CUDA graph, PDL on,
for several GEMV launch shapes: rows per program (block_n), warps per program and the prefetch budget
(weight elements a program loads before its PDL wait). Weights from HBM (48 products, 187 MB, > L2).
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


def products():
    residual.copy_(start)
    for w in W:
        fused.norm_linear(residual, norm, 1e-6, w["qkv"])
        fused.linear_add_(residual, attn_out, w["o"])
        gate_up = fused.norm_linear(residual, norm, 1e-6, w["gate_up"])
        fused.swiglu_linear_add_(residual, gate_up, w["down"])


def variant(block_n_of, warps, budget):
    def gemv(x, norm_weight, weight, out, res, eps, prologue, n_in):
        rows, n_out = x.shape[0], weight.shape[0]
        block_n = block_n_of(n_out)
        tiles = fused._prefetch_tiles(n_in, budget // block_n)
        fused._gemv_kernel[(triton.cdiv(n_out, block_n), rows)](
            x, norm_weight if norm_weight is not None else weight, weight, out,
            res if res is not None else out, n_out,
            x.stride(0), weight.stride(0), out.stride(0), res.stride(0) if res is not None else 0,
            eps, N_IN=n_in, PROLOGUE=prologue, HAS_RES=res is not None, BLOCK_N=block_n,
            PRE0=tiles[0], PRE1=tiles[1], PRE2=tiles[2],
            BLOCK_K=min(256, triton.next_power_of_2(max(16, n_in - sum(tiles)))), num_warps=warps,
            **pdl.launch_args(x.device),
        )  # fmt: skip

    return gemv


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


variants = {
    "shipped (2|4 rows, 1 warp, 6144)": fused._gemv,
    "2|4 rows, 1 warp, 4096": variant(lambda n: 2 if n <= 2048 else 4, 1, 4096),
    "1 row, 1 warp, 6144": variant(lambda n: 1, 1, 6144),
    "2 rows, 1 warp, 6144": variant(lambda n: 2, 1, 6144),
    "4 rows, 1 warp, 12288": variant(lambda n: 4, 1, 12288),
    "4 rows, 2 warps, 12288": variant(lambda n: 4, 2, 12288),
    "8 rows, 2 warps, 24576": variant(lambda n: 8, 2, 24576),
    "2|4 rows, 1 warp, 12288": variant(lambda n: 2 if n <= 2048 else 4, 1, 12288),
}
shipped = fused._gemv
ref = None
with torch.no_grad():
    for name, gemv in variants.items():
        fused._gemv = gemv
        ms = graph_ms()
        out = residual.float().clone()
        ref = out if ref is None else ref
        err = (out - ref).abs().max().item()
        print(f"{name:34s} {ms * 1e3 / 48:6.2f} us a product, {ms:.3f} ms the 48 (|diff| vs first {err:.2g})")
fused._gemv = shipped
