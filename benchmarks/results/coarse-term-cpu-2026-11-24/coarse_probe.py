"""Would a coarse term over the unselected blocks close the SSA models' held-out gap past 4K?

A probe, not a model feature. Each ``local_rope`` SSA layer's attention is replaced by one softmax over
(a) the token's selected keys, scored exactly as the model does (rotary in the local window), and
(b) one summary key per causal block the router did not select: the block's mean key, position-free,
with ``log(block_size)`` added to its score (the mass of ``block_size`` keys scoring like the mean), and
the block's mean value. With (b) off it is the model's own sparse attention (``--check`` asserts that
against ``sparse_attention_torch`` on random inputs first). It runs query chunks against every earlier key
(O(T^2)), so it is for CPU-sized measurements, not speed.

    PYTHONPATH=src python benchmarks/results/coarse-term-cpu-2026-11-24/coarse_probe.py --check \
        --model runs/twinlr/nano-dense --corpus /tmp/coarse-corpus --windows 2 --out twin.json

Variants per model: as saved (dense for the twin: its reference), SSA, and SSA with the coarse term.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.models.sparse_torch import sparse_attention_torch
from subquad.models.subquad.modeling import SubquadAttention
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.select import select_blocks
from subquad.train.trainer import heldout_loss_by_position

QUERY_CHUNK = 512


def attention_with_coarse_term(
    q, k, v, block_idx, block_size, scale, rotary, local_blocks, coarse, bias=None
):
    """q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` (unrotated, T == S), block_idx ``[B, Hkv, T, K]``.
    Exact softmax over the selected keys (rotated scores for keys in the query's local window), plus,
    with ``coarse``, one summary entry per unselected complete causal block, its score raised by ``bias``
    (None: ``log(block_size)``). Returns ``[B, T, Hq, D]``."""
    batch, steps, hq, dim = q.shape
    hkv, group = k.shape[2], hq // k.shape[2]
    if steps != k.shape[1]:
        raise ValueError(f"q length {steps} != key length {k.shape[1]}: the probe runs whole windows")
    nb = -(-steps // block_size)
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
    positions = torch.arange(steps, device=q.device)
    q_rot = rotary(q.float(), positions[None, :, None]).transpose(1, 2)
    k_rot = rotary(k.float(), positions[None, :, None]).transpose(1, 2).repeat_interleave(group, 1)
    full = nb * block_size
    pad = full - steps
    k_mean = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(batch, hq, nb, block_size, dim).mean(3)
    v_mean = torch.nn.functional.pad(vf, (0, 0, 0, pad)).view(batch, hq, nb, block_size, dim).mean(3)
    out = torch.empty(batch, hq, steps, dim)
    for t0 in range(0, steps, QUERY_CHUNK):
        t1 = min(steps, t0 + QUERY_CHUNK)
        pos = positions[t0:t1]
        keys = torch.arange(t1, device=q.device)
        # Selected blocks of each query, per KV head, shared by its query heads: [B, Hq, Tc, nb].
        idx = block_idx[:, :, t0:t1].long()
        chosen = torch.zeros(batch, hkv, t1 - t0, nb + 1, dtype=torch.bool)
        chosen.scatter_(3, torch.where(idx < 0, nb, idx), True)
        chosen = chosen[..., :nb].repeat_interleave(group, 1)
        key_ok = chosen.repeat_interleave(block_size, 3)[..., :t1] & (keys[None, :] <= pos[:, None])
        window_start = ((pos // block_size - local_blocks + 1).clamp(min=0) * block_size)[:, None]
        local = (keys[None, :] >= window_start) & (keys[None, :] <= pos[:, None])
        scores = qf[:, :, t0:t1] @ kf[:, :, :t1].transpose(-1, -2)
        slab = int(window_start.min())  # rotated scores only where some query's window reaches
        rotated = q_rot[:, :, t0:t1] @ k_rot[:, :, slab:t1].transpose(-1, -2)
        scores[..., slab:] = torch.where(local[:, slab:], rotated, scores[..., slab:])
        scores = scores * scale
        scores = scores.masked_fill(~key_ok, -math.inf)
        values = [vf[:, :, :t1]]
        if coarse:
            complete = (torch.arange(nb) + 1) * block_size - 1 <= pos[:, None]  # [Tc, nb]
            bias = math.log(block_size) if bias is None else bias
            summary = (qf[:, :, t0:t1] @ k_mean.transpose(-1, -2)) * scale + bias
            scores = torch.cat([scores, summary.masked_fill(chosen | ~complete, -math.inf)], dim=-1)
            values.append(v_mean)
        out[:, :, t0:t1] = torch.softmax(scores, dim=-1) @ torch.cat(values, dim=2)
    return out.transpose(1, 2).to(q.dtype)


def patch(coarse: bool, bias: float | None = None) -> None:
    """Route every ``local_rope`` SSA layer through :func:`attention_with_coarse_term`."""

    def attend_sparse(self, q, k, v, summaries, route=None):
        if self.config.position_scheme != "local_rope" or summaries is not None:
            raise ValueError("the probe covers local_rope models on whole windows only")
        ssa = self.config.ssa_config
        selection = self.select(q, k, summaries, route)
        return attention_with_coarse_term(
            q,
            k,
            v,
            selection.block_idx,
            ssa.block_size,
            self.scale,
            self.rotary,
            ssa.local_blocks,
            coarse,
            bias,
        )

    SubquadAttention._attend_sparse = attend_sparse


def check() -> None:
    """Without the coarse term the probe equals the model's sparse attention (random, odd sizes)."""
    from subquad.models.subquad.modeling import SubquadRotary

    gen = torch.Generator().manual_seed(0)
    config = SSAConfig(block_size=16, top_k=3, local_blocks=2, sink_blocks=1)
    rotary = SubquadRotary(32, 10000.0)
    q = torch.randn(2, 203, 4, 32, generator=gen)
    k, v = (torch.randn(2, 203, 2, 32, generator=gen) for _ in range(2))
    selection = select_blocks(q, k, config, causal=True)
    want = sparse_attention_torch(q, k, v, selection.block_idx, 16, 32**-0.5, local_rotary=(rotary, 1, 2))
    got = attention_with_coarse_term(q, k, v, selection.block_idx, 16, 32**-0.5, rotary, 2, coarse=False)
    err = (got - want).abs().max().item()
    if err > 1e-4:
        raise SystemExit(f"check failed: probe vs sparse_attention_torch max error {err:.2e}")
    with_coarse = attention_with_coarse_term(
        q, k, v, selection.block_idx, 16, 32**-0.5, rotary, 2, coarse=True
    )
    if torch.allclose(with_coarse, want):
        raise SystemExit("check failed: the coarse term changed nothing")
    print(f"check: probe without the coarse term matches sparse_attention_torch (max error {err:.1e})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--edges", default="1024,4096,16384")
    p.add_argument("--ssa", default="", help="SSA settings for the SSA variants, e.g. top_k=16")
    p.add_argument("--variants", default="saved,ssa,coarse")
    p.add_argument(
        "--coarse-bias",
        type=float,
        default=None,
        help="added to a summary's score (default: log(block_size))",
    )
    p.add_argument("--check", action="store_true", help="run the self-check first")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.check:
        check()
    torch.set_grad_enabled(False)
    edges = [int(e) for e in args.edges.split(",")]
    results = {"model": args.model, "corpus": args.corpus, "seq_len": args.seq_len, "windows": args.windows,
               "coarse_bias": args.coarse_bias, "torch": torch.__version__, "variants": {}}  # fmt: skip
    saved_attend = SubquadAttention._attend_sparse
    for variant in args.variants.split(","):
        config = SubquadConfig.from_pretrained(args.model)
        if variant != "saved":
            config.attention = "ssa"
            overrides = dict(kv.split("=") for kv in args.ssa.split(",") if kv)
            overrides = {key: (int(val) if val.isdigit() else val) for key, val in overrides.items()}
            config.ssa = SSAConfig.from_dict(SSAConfig.override(config.ssa, overrides)).to_dict()
            patch(coarse=variant == "coarse", bias=args.coarse_bias)
        else:
            SubquadAttention._attend_sparse = saved_attend
        model = SubquadForCausalLM.from_pretrained(args.model, config=config, dtype=torch.float32)
        start = time.time()
        spans = heldout_loss_by_position(
            model, args.corpus, args.seq_len, args.windows * args.seq_len, "cpu", edges
        )
        loss = sum(s["loss"] * s["tokens"] for s in spans) / sum(s["tokens"] for s in spans)
        results["variants"][variant] = {"attention": config.attention, "ssa": config.ssa if variant != "saved"
                                        else None, "heldout_loss": loss, "by_position": spans,
                                        "seconds": round(time.time() - start, 1)}  # fmt: skip
        print(f"{variant}: {loss:.4f} | " + " / ".join(f"{s['loss']:.4f}" for s in spans), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
