"""A dense prefill chunk (the last T of S positions) on CUDA: the explicit-mask loop the model used
before against the bottom-right CausalBias path it uses now, nano-twin shapes (5 query heads, 1 KV
head, D=64, bf16). Equality on a mid-size chunk, then time per chunk at 1M keys.

    PYTHONPATH=src python benchmarks/results/twin-2026-11-24/dense_chunk_path.py
"""

import time

import torch
import torch.nn.functional as F

from subquad.models.subquad import modeling


def masked_chunks(qt, kt, vt, scale):
    """The earlier path: SDPA with an explicit (rows, S) mask, 2^28 mask elements a call."""
    steps, seq_len = qt.shape[2], kt.shape[2]
    chunk = max(1, modeling._DENSE_MASK_ELEMENTS // seq_len)
    key_pos = torch.arange(seq_len, device=qt.device)
    outs = []
    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        rows = torch.arange(seq_len - steps + start, seq_len - steps + stop, device=qt.device)
        mask = key_pos <= rows[:, None]
        outs.append(
            F.scaled_dot_product_attention(
                qt[:, :, start:stop], kt, vt, attn_mask=mask, scale=scale, enable_gqa=True
            )
        )
    return torch.cat(outs, dim=2)


def timed(fn, args, repeats=3):
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    torch.manual_seed(0)
    dev, dt, scale = "cuda", torch.bfloat16, 64**-0.5
    for steps, seq_len in ((4093, 65_537), (32_768, 1_048_576)):
        qt = torch.randn(1, 5, steps, 64, device=dev, dtype=dt)
        kt = torch.randn(1, 1, seq_len, 64, device=dev, dtype=dt)
        vt = torch.randn(1, 1, seq_len, 64, device=dev, dtype=dt)
        new = modeling._dense_lower_right(qt, kt, vt, scale)
        old = masked_chunks(qt, kt, vt, scale)
        err = (new.float() - old.float()).abs().max().item()
        t_new = timed(modeling._dense_lower_right, (qt, kt, vt, scale))
        t_old = timed(masked_chunks, (qt, kt, vt, scale), repeats=1)
        flops = 4 * 5 * 64 * steps * (seq_len - steps / 2)
        print(
            f"T={steps} S={seq_len}: max |new - old| {err:.2e}; masked chunks {t_old * 1e3:.1f} ms, "
            f"lower-right {t_new * 1e3:.1f} ms ({t_old / t_new:.1f}x; {flops / t_new / 1e12:.0f} TFLOP/s)"
        )


if __name__ == "__main__":
    main()
