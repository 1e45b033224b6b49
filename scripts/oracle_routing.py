"""Retrieval with an oracle router: what a model would score if its routing were perfect.

Every SSA layer's router is replaced by the target the router loss trains towards: for each query
token, the ``top_k`` candidate blocks holding the most mass of the layer's own dense softmax over
the candidates (the mean over a KV head's query heads; keys scored as the layer scores routed blocks,
pre-rotary under ``local_rope``). Sinks, local window and budget stay the model's, so the gap between
this and the real router is what routing loses, and what is still missed with it is the reader's.
Raising ``top_k`` instead is no upper bound: a model trained at one budget degrades with more routed
blocks (benchmarks/NOTES.md item 26). Dense per query, so for diagnosis at up to ~128K only.

    PYTHONPATH=src python scripts/oracle_routing.py --lengths 32k --tasks niah_single_1,niah_single_2 \\
        --samples 50 --device cuda --out runs/oracle
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from subquad.demo import default_model_path
from subquad.eval.runner import evaluate, load_model
from subquad.ops.ssa.select import SSASelection, _query_chunks, _topk_blocks, is_candidate, select_blocks


def oracle_routed_blocks(q: torch.Tensor, k: torch.Tensor, config, scale: float) -> torch.Tensor:
    """The ``top_k`` candidate blocks by dense attention mass, ``[B, Hkv, T, top_k]`` int32, -1 padded.

    q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]`` (bottom-right aligned, causal) as the layer scores them.
    """
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k, heads_kv = k.shape[1], k.shape[2]
    group, bs = heads_q // heads_kv, config.block_size
    num_blocks = -(-seq_len_k // bs)
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, num_blocks * bs - seq_len_k))
    keys = keys.repeat_interleave(group, dim=2).permute(0, 2, 3, 1)  # [B, Hq, D, NB * bs]
    blocks = torch.arange(num_blocks, device=q.device)
    out = []
    per_token = batch * heads_q * num_blocks * bs
    for start, stop, first_pos in _query_chunks(seq_len_q, seq_len_k, per_token, q.device):
        qblock = torch.arange(first_pos, first_pos + stop - start, device=q.device) // bs
        candidate = is_candidate(blocks.expand(stop - start, -1), qblock, config, True, num_blocks)
        scores = torch.matmul(q[:, start:stop].float().transpose(1, 2) * scale, keys)  # [B, Hq, Tc, S']
        scores = scores.view(batch, heads_q, stop - start, num_blocks, bs)
        scores = scores.masked_fill(~candidate[:, :, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Tc, NB]
        mass = torch.softmax(lse, dim=-1).nan_to_num(0.0)  # rows without candidates: all -inf
        mass = mass.view(batch, heads_kv, group, stop - start, num_blocks).mean(2)
        out.append(_topk_blocks(mass.masked_fill(~candidate, float("-inf")), None, config.top_k))
    return torch.cat(out, dim=2)


def install_oracle(model) -> None:
    """Route every SSA layer of ``model`` (a ``SubquadForCausalLM``) with :func:`oracle_routed_blocks`."""
    config = model.config.ssa_config
    fixed_only = dataclasses.replace(config, top_k=0)
    for layer in model.model.layers:
        attention = layer.self_attn

        def select(q, k, summaries=None, route=None, attention=attention) -> SSASelection:
            with torch.no_grad():
                fixed = select_blocks(q, k, fixed_only, causal=True)
                routed = oracle_routed_blocks(q, k, config, attention.scale)
            block_idx = torch.cat([fixed.block_idx, routed], dim=-1).contiguous()
            return SSASelection(block_idx, config.block_size, fixed.num_fixed_slots)

        attention.select = select


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--lengths", default="4k")
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    if model.config.attention != "ssa" or model.config.position_scheme != "local_rope":
        raise SystemExit(
            f"--model {args.model!r}: needs an SSA model with position_scheme='local_rope' (its router is "
            f"called per layer), got attention={model.config.attention!r}, "
            f"position_scheme={model.config.position_scheme!r}"
        )
    install_oracle(model)
    evaluate(model, tokenizer, suite="ruler", lengths=args.lengths, num_samples=args.samples,
             out_dir=args.out, tasks=args.tasks, max_new_tokens=args.max_new_tokens,
             model_name="oracle-router", progress=True)  # fmt: skip


if __name__ == "__main__":
    main()
