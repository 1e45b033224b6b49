"""What a link of the graphed decode step's kernel chain costs on its own: CUDA graphs of 96 dependent
launches of (a) an empty kernel (only the PDL wait and release), (b) a kernel that loads the previous
kernel's 768-element output row, reduces it and stores its share of the next (a GEMV with no weights),
(c) a top-k of 512 int64 keys written by the previous kernel (the decode pick's sort), replayed; PDL on and
off, several grids and warp counts. Run from the repo root: `PYTHONPATH=src python <this file>`."""

import time

import torch
import triton
import triton.language as tl

from subquad.ops import pdl

LINKS = 96


@triton.jit
def _empty_kernel(X, PDL: tl.constexpr):
    pdl.wait(PDL)


@triton.jit
def _row_kernel(X, Y, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    x = tl.load(X + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < N, other=0.0).to(tl.float32)
    total = tl.sum(x * x, 0)
    offs = tl.program_id(0) * 2 + tl.arange(0, 2)
    mine = tl.load(X + offs).to(tl.float32)
    tl.store(Y + offs, (mine * 0.5 + total * 1e-6).to(Y.dtype.element_ty), mask=offs < N)


@triton.jit
def _topk_kernel(X, Y, N: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    keys = tl.load(X + row * N + tl.arange(0, N))[None, :]
    top = tl.sort(tl.topk(keys, K), descending=True)
    # the next link's input: the top keys spread back over the row (so it cannot be elided)
    cols = tl.arange(0, N)[None, :]
    out = tl.load(X + row * N + cols) ^ tl.sum(top, 1)[:, None]
    tl.store(Y + row * N + cols, out)


def timed(fn, replays=50):
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


def chain(launch):
    def body():
        for i in range(LINKS):
            launch(i)

    return timed(graphed(body)) * 1e3 / LINKS


bufs = [torch.randn(768, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
keys = [torch.randint(0, 1 << 62, (2 * 19 * 512,), device="cuda", dtype=torch.int64) for _ in range(2)]
rows = []
for on in (True, False):
    pdl.ENABLED = on
    la = pdl.launch_args(torch.device("cuda"))
    for grid in (1, 38, 132, 384, 1408):
        for warps in (1, 4):
            us = chain(lambda i, g=grid, w=warps, a=la: _empty_kernel[(g,)](bufs[0], num_warps=w, **a))
            rows.append((f"empty grid {grid} warps {warps}", on, us))
    for warps in (1, 4):
        us = chain(
            lambda i, w=warps, a=la: _row_kernel[(384,)](
                bufs[i % 2], bufs[1 - i % 2], N=768, BLOCK=1024, num_warps=w, **a
            )
        )
        rows.append((f"row 768 -> 2 a program, grid 384 warps {warps}", on, us))
    for n in (256, 512):
        for warps in (1, 2, 4):
            us = chain(
                lambda i, n=n, w=warps, a=la: _topk_kernel[(2, 19)](
                    keys[i % 2], keys[1 - i % 2], N=n, K=16, num_warps=w, **a
                )
            )
            rows.append((f"top-16 of {n} int64, grid 38 warps {warps}", on, us))
pdl.ENABLED = True
print(f"{'chain of 96 links':48s} {'PDL':>4s} {'us a link':>10s}")
for name, on, us in rows:
    print(f"{name:48s} {'on' if on else 'off':>4s} {us:10.2f}")
