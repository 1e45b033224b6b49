"""Does the router find the needle? Rank of the needle's block for the prompt's last token, per layer.

Retrieval can fail in two places: the router never selects the block holding the needle, or it
does and the model cannot read the answer out of it. This prefills ``--samples`` needle prompts per
length (``subquad.eval.niah``, or with ``--task`` a RULER single-needle task's) and, in every layer,
scores all earlier blocks with the last token's routing query (the first answer token is predicted
there). It reports the needle block's rank among the routing candidates (1 = best; the router takes
the ``top_k`` best) and whether it was selected, the block's rank and share in the layer's own dense
softmax over the same candidates (the target the router loss trains towards), and its share of the
sparse attention the layer actually computes: a needle that attention would weigh but the router
ranks low is a routing miss; one that is routed but holds little of the attention is a reading miss.

    PYTHONPATH=src python scripts/needle_routing.py --lengths 32k,1m,4m,12m --device cuda --out needle.json
    PYTHONPATH=src python scripts/needle_routing.py --task niah_single_1 --lengths 1m --device cuda \
        --ssa summary=max,sub_block_size=4 --suffix " listed as" --dump dumps/
    PYTHONPATH=src python scripts/routing_rules.py dumps/*.pt   # ranks under other scoring rules
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from subquad._args import key_values
from subquad.benchmark import parse_length
from subquad.demo import default_model_path
from subquad.eval import niah, ruler
from subquad.eval.runner import load_model
from subquad.ops.ssa.select import block_scores, routing_queries, routing_summaries


def candidate_mass(q_last, k, ssa, scale: float, last_block: int) -> torch.Tensor:
    """Share of each block in the last token's dense softmax over the routing candidates, ``[Hkv, NB]``
    (mean over a KV head's query heads): what the router is trained to match. Scores use the keys as
    the layer scores routed blocks (pre-rotary under ``local_rope``); non-candidates get 0."""
    heads_kv, group = k.shape[2], q_last.shape[2] // k.shape[2]
    num_blocks = -(-k.shape[1] // ssa.block_size)
    stop = (last_block - ssa.local_blocks + 1) * ssa.block_size
    keys = k[0, ssa.sink_blocks * ssa.block_size : stop].float()  # [S', Hkv, D]
    scores = torch.einsum("hgd,shd->hgs", q_last[0, 0].float().view(heads_kv, group, -1), keys) * scale
    blocks = torch.softmax(scores, dim=-1).mean(1).view(heads_kv, -1, ssa.block_size).sum(-1)
    mass = torch.zeros(heads_kv, num_blocks)
    mass[:, ssa.sink_blocks : ssa.sink_blocks + blocks.shape[1]] = blocks
    return mass


def attention_shares(attention, q, k, selected: torch.Tensor, target_block: int) -> dict[str, list[float]]:
    """Where the last token's sparse attention goes: the share of block ``target_block`` (``needle``)
    and of the other ``sink``, ``local`` and ``routed`` blocks in its layer's own softmax over the keys
    it attends to (local ones rotated under ``local_rope``), per KV head, mean over its query heads.
    ``selected``: ``[1, Hkv, 1, K]``, slots as ``SSASelection`` orders them."""
    ssa = attention.config.ssa_config
    bs, last_pos = ssa.block_size, k.shape[1] - 1
    heads_kv = k.shape[2]
    group = q.shape[2] // heads_kv
    local_slots = range(ssa.sink_blocks, ssa.sink_blocks + ssa.local_blocks)
    rotated = attention.config.position_scheme == "local_rope"
    kinds = ("needle", "sink", "local", "routed")
    shares: dict[str, list[float]] = {kind: [] for kind in kinds}
    for h in range(heads_kv):
        q_h = q[0, -1, h * group : (h + 1) * group].float()  # [G, D]
        logits, owner = [], []
        for slot, block in enumerate(selected[0, h, 0].tolist()):
            if block < 0:
                continue
            pos = torch.arange(block * bs, min((block + 1) * bs, last_pos + 1), device=k.device)
            keys, queries = k[0, pos, h].float(), q_h
            if rotated and slot in local_slots:
                keys = attention.rotary(keys, pos)
                queries = attention.rotary(q_h, torch.full((group,), last_pos, device=k.device))
            logits.append(queries @ keys.T * attention.scale)
            if block == target_block:
                kind = 0
            else:
                kind = 1 if slot < ssa.sink_blocks else 2 if slot in local_slots else 3
            owner.append(torch.full((len(pos),), kind, device=k.device))
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)  # [G, keys attended]
        owner = torch.cat(owner)
        for i, kind in enumerate(kinds):
            shares[kind].append(probs[:, owner == i].sum(-1).mean().item())
    return shares


def block_ranks(
    model, ids: torch.Tensor, target_token: int, sub_blocks: tuple[int, ...] = (), dump: list | None = None
) -> dict:
    """Prefill ``ids`` ``[1, T]`` once; per layer, the rank (per KV head) of the block holding
    ``target_token`` among the last token's routing candidates, and whether it was attended. A block
    among the sinks or in the local window is always attended: rank None, ``"always": True``.
    For each size ``n`` in ``sub_blocks`` also ``rank_max{n}``: the rank if a block scored as the best
    of its ``n``-token sub-block means (same routing queries and keys), and ``share_needle`` /
    ``_sink`` / ``_local`` / ``_routed``: where the layer's sparse attention goes
    (:func:`attention_shares`). ``dump``: a list that gets,
    per layer, the last token's routing score against every key before its local window
    (``token_scores [Hkv, keys]`` fp32; a block's mean score is the mean of its keys') and the dense
    block mass (``mass [Hkv, NB]``), for ``scripts/routing_rules.py`` to rank blocks under other rules."""
    ssa = model.config.ssa_config
    target_block = target_token // ssa.block_size
    last_block = (ids.shape[1] - 1) // ssa.block_size
    always = target_block < ssa.sink_blocks or target_block > last_block - ssa.local_blocks
    layers = []

    def capture(attention, original):
        def wrapped(q, k, v, summaries, route=None):
            if k.shape[1] == ids.shape[1]:  # the chunk holding the prompt's last token
                row = {"layer": attention.layer_idx, "always": always}
                if always:
                    row.update(rank=None, candidates=None, selected=True)
                else:
                    # What the layer routes with: its own q/k, or its learned router's.
                    route_q, route_k = (q, k) if route is None else route
                    summ = routing_summaries(route_k, ssa) if summaries is None else summaries
                    last = routing_queries(route_q[:, -1:], k.shape[2])[:, 0]
                    scores = torch.einsum("bhd,bnhd->bhn", last.float(), summ.float())
                    scores = block_scores(scores, ssa, -(-k.shape[1] // ssa.block_size))  # summary="max"
                    # Candidates: complete blocks after the sinks and before the local window.
                    candidates = scores[0, :, ssa.sink_blocks : last_block - ssa.local_blocks + 1]
                    target_score = candidates[:, target_block - ssa.sink_blocks]
                    rank = (candidates > target_score[:, None]).sum(-1) + 1
                    # The last token's score against every key of the candidate blocks and before
                    # them: a sub-block mean's score is the mean of its keys' scores.
                    stop = last_block - ssa.local_blocks + 1  # candidates end before this block
                    keys = route_k[0, : stop * ssa.block_size].float()  # [keys, Hkv, D]
                    token_scores = torch.einsum("hd,shd->hs", last[0].float(), keys)  # [Hkv, keys]
                    # The same ranking if a block scored as the best of its sub-block means.
                    for sub in sub_blocks:
                        best = token_scores.view(token_scores.shape[0], stop, -1, sub).mean(-1).amax(-1)
                        cand = best[:, ssa.sink_blocks :]
                        t = cand[:, target_block - ssa.sink_blocks]
                        row[f"rank_max{sub}"] = ((cand > t[:, None]).sum(-1) + 1).tolist()
                    mass = candidate_mass(q[:, -1:], k, ssa, attention.scale, last_block)
                    row.update(attention_rank=((mass > mass[:, [target_block]]).sum(-1) + 1).tolist(),
                               attention_mass=mass[:, target_block].tolist())  # fmt: skip
                    if dump is not None:
                        layer_scores = {"mass": mass, "token_scores": token_scores.cpu()}
                        dump.append({"layer": attention.layer_idx, **layer_scores})
                    last_route = None if route is None else (route[0][:, -1:], route[1])
                    selected = attention.select(q[:, -1:], k, summaries, last_route).block_idx
                    row.update(rank=rank.tolist(), candidates=candidates.shape[-1],
                               selected=bool((selected == target_block).any()))  # fmt: skip
                    shares = attention_shares(attention, q, k, selected, target_block)
                    row.update({f"share_{kind}": value for kind, value in shares.items()})
                layers.append(row)
            return original(q, k, v, summaries, route)

        return wrapped

    attentions = [layer.self_attn for layer in model.model.layers]
    for attention in attentions:
        attention._attend_sparse = capture(attention, attention._attend_sparse)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
        seconds = time.perf_counter() - start
    finally:
        for attention in attentions:
            del attention._attend_sparse  # back to the class method
    return {"target_block": target_block, "seconds": seconds, "layers": layers}


def needle_prompts(task: str, length: int, depth: float, tokenizer, samples: int, seed: int) -> list:
    """``samples`` prompts: the essay needle at ``depth`` percent (``task="niah"``) or a RULER
    single-needle task's, the same ones ``subquad eval`` asks for that seed."""
    if task == "niah":
        return niah.generate(length, depth, tokenizer, num_samples=samples, seed=seed)
    return ruler.generate(task, length, tokenizer, num_samples=samples, seed=seed)


def needle_ranks(
    model, tokenizer, sample, suffix: str = "", sub_blocks: tuple[int, ...] = (), dump: list | None = None
) -> dict:
    ids = tokenizer(sample.input + suffix, return_tensors="pt").input_ids.to(model.device)
    # The needle's value is the first place its digits appear; its token index is the length of the
    # prompt's text before it, tokenized the same way.
    value_at = sample.input.index(sample.answers[0])
    needle_token = len(tokenizer(sample.input[:value_at]).input_ids)
    ranks = block_ranks(model, ids, needle_token, sub_blocks, dump)
    return {"task": sample.task, "length": sample.length, "index": sample.index,
            "prompt_tokens": ids.shape[1], "needle_token": needle_token,
            "needle_block": ranks["target_block"], "seconds": ranks["seconds"],
            "layers": ranks["layers"]}  # fmt: skip


def save_dump(directory: str, result: dict, seed: int, ssa, layers: list) -> str:
    """Write one prompt's per-layer scores as ``{task}-{length}-s{seed}-{index}.pt`` in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{result['task']}-{result['length']}-s{seed}-{result['index']}.pt")
    torch.save({"needle_token": result["needle_token"], "prompt_tokens": result["prompt_tokens"],
                "block_size": ssa.block_size, "sink_blocks": ssa.sink_blocks,
                "local_blocks": ssa.local_blocks, "top_k": ssa.top_k, "layers": layers}, path)  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--lengths", default="4k,16k")
    parser.add_argument("--depth", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1, help="prompts per length")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--suffix", default="",
        help="text appended to the prompt, e.g. the words a model says before the value ('listed as')",
    )  # fmt: skip
    parser.add_argument(
        "--sub-blocks", default="",
        help="also rank blocks by their best sub-block mean, for these sub-block sizes (tokens, e.g. 16,4,1)",
    )  # fmt: skip
    parser.add_argument(
        "--task", default="niah",
        help="'niah' (the essay needle at --depth) or a RULER single-needle task, e.g. niah_single_1",
    )  # fmt: skip
    parser.add_argument(
        "--dump", default=None,
        help="directory for each prompt's per-layer token scores (for scripts/routing_rules.py)",
    )  # fmt: skip
    parser.add_argument(
        "--ssa", default=None,
        help="route under other SSA settings, as `subquad eval --ssa` (e.g. summary=max,sub_block_size=4)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.task != "niah" and not args.task.startswith("niah_single"):
        raise SystemExit(f"--task {args.task!r}: expected 'niah' or a RULER niah_single_* task")
    sub_blocks = tuple(int(n) for n in args.sub_blocks.split(",") if n)
    ssa = key_values(args.ssa) if args.ssa else None
    model, tokenizer = load_model(args.model, device=args.device, ssa=ssa)
    if model.config.attention != "ssa":
        raise SystemExit(f"--model {args.model!r}: attention={model.config.attention!r}, needs an SSA model")
    block_size = model.config.ssa_config.block_size
    if any(n < 1 or block_size % n for n in sub_blocks):
        raise SystemExit(f"--sub-blocks {args.sub_blocks!r}: expected sizes dividing block_size={block_size}")
    results = []
    prompts = [
        (text, sample)
        for text in args.lengths.split(",")
        for sample in needle_prompts(
            args.task, parse_length(text), args.depth, tokenizer, args.samples, args.seed
        )
    ]
    for text, sample in prompts:
        dump = [] if args.dump else None
        result = needle_ranks(model, tokenizer, sample, args.suffix, sub_blocks, dump)
        results.append(result)
        if dump:
            save_dump(args.dump, result, args.seed, model.config.ssa_config, dump)
        layers = result["layers"]
        ranks = " ".join("local" if x["always"] else f"{min(x['rank'])}{'*' if x['selected'] else ''}"
                         for x in layers)  # fmt: skip
        attention = " ".join(
            "local" if x["always"] else f"{min(x['attention_rank'])}/{max(x['attention_mass']):.2f}"
            for x in layers
        )
        shares = " ".join("-" if x["always"] else f"{max(x['share_needle']):.2f}" for x in layers)
        print(
            f"{text} #{sample.index}: needle block {result['needle_block']} of {layers[0]['candidates']} "
            f"candidates; rank per layer (* = selected): {ranks}; by the layer's dense attention "
            f"(rank/mass): {attention}; its share of the layer's sparse attention: {shares}; "
            f"{result['seconds']:.1f} s",
            flush=True,
        )
        for sub in sub_blocks:
            sub_ranks = " ".join("local" if x["always"] else str(min(x[f"rank_max{sub}"])) for x in layers)
            print(f"  rank by the best {sub}-token sub-block mean: {sub_ranks}")
    if args.out:
        with open(args.out, "w") as f:
            summary = {"model": args.model, "ssa": model.config.ssa, "task": args.task, "depth": args.depth,
                       "seed": args.seed, "suffix": args.suffix, "sub_blocks": sub_blocks,
                       "results": results}  # fmt: skip
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
