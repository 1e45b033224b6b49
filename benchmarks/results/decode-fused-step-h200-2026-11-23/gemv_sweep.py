"""`subquad.ops.fused`'s decode GEMV kernel under tile choices (output rows, K chunk, warps) against the
cuBLAS path (the matmul plus its RMSNorm / SwiGLU / residual kernels), `small`'s four products at
batch 1, each timed as 200 calls in one CUDA graph. The same weights every call, so they sit in L2:
these times rank tiles, they are not a decode step's (`step_kernels.py`, weights from HBM).
Run from the repo root: `PYTHONPATH=src python <this file> [case index ...]` (default: all four)."""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton

from subquad.ops import fused

DEVICE, DTYPE = "cuda", torch.bfloat16
HIDDEN, INNER = 768, 2816


def graph_time(fn, reps: int = 200) -> float:
    """Microseconds per call of ``fn``, replayed as ``reps`` calls in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        for _ in range(reps):
            fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / (5 * reps)


def cublas_path(x, norm_w, w, res, prologue, n_in):
    if prologue == 1:
        return lambda: F.linear(fused.rms_norm(x, norm_w, 1e-6), w)
    if prologue == 0:
        return lambda: res.addmm_(x, w.t())
    return lambda: res.addmm_(fused.silu_mul(x[:, :n_in], x[:, n_in:]), w.t())


def kernel_call(x, norm_w, w, res, prologue, n_in, block_n, block_k, warps):
    n_out = w.shape[0]
    out = torch.empty(1, n_out, device=DEVICE, dtype=DTYPE) if res is None else res
    grid = (triton.cdiv(n_out, block_n), 1)
    args = (x, w if norm_w is None else norm_w, w, out, out, n_out, x.stride(0), w.stride(0), out.stride(0))
    args += (out.stride(0), 1e-6)
    flags = dict(N_IN=n_in, PROLOGUE=prologue, HAS_RES=res is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return lambda: fused._gemv_kernel[grid](*args, **flags, num_warps=warps)


def sweep(name, case) -> None:
    n_in = case[-1]
    base = graph_time(cublas_path(*case))
    rows = []
    for block_n, block_k, warps in itertools.product(
        [1, 2, 4, 8, 16, 32], [128, 256, 512, 1024], [1, 2, 4, 8]
    ):
        if block_k > triton.next_power_of_2(n_in) or block_n * block_k > 16384:
            continue
        try:
            rows.append((graph_time(kernel_call(*case, block_n, block_k, warps)), block_n, block_k, warps))
        except Exception as err:  # noqa: BLE001 (a tile that does not compile or fit is skipped)
            print(f"   n{block_n} k{block_k} w{warps}: {type(err).__name__}")
    rows.sort()
    best = ", ".join(f"{t:.2f} us (n{n} k{k} w{w})" for t, n, k, w in rows[:5])
    print(f"{name}: cuBLAS path {base:.2f} us; best: {best}", flush=True)


def main() -> None:
    x = torch.randn(1, HIDDEN, device=DEVICE, dtype=DTYPE)
    norm_w = torch.ones(HIDDEN, device=DEVICE, dtype=DTYPE)
    res = torch.randn(1, HIDDEN, device=DEVICE, dtype=DTYPE)
    gate_up = torch.randn(1, 2 * INNER, device=DEVICE, dtype=DTYPE)

    def weight(n_out, n_in):
        return torch.randn(n_out, n_in, device=DEVICE, dtype=DTYPE) / n_in**0.5

    cases = [  # (name, (x, norm weight, weight, residual, prologue, K))
        ("qkv norm 768->1024", (x, norm_w, weight(1024, HIDDEN), None, 1, HIDDEN)),
        ("o +res 768->768", (x, None, weight(HIDDEN, HIDDEN), res, 0, HIDDEN)),
        ("gate_up norm 768->5632", (x, norm_w, weight(2 * INNER, HIDDEN), None, 1, HIDDEN)),
        ("down swiglu+res 2816->768", (gate_up, None, weight(HIDDEN, INNER), res, 2, INNER)),
    ]
    for index in [int(a) for a in sys.argv[1:]] or range(len(cases)):
        sweep(*cases[index])


if __name__ == "__main__":
    main()
