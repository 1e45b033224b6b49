"""`tests/models/test_graphed.py::test_cuda_graph_replays_equal_eager_steps`'s plan, printing how far the
graphed step's logits are from the eager step's: the largest difference before the eager steps, and after
them (where the two caches hold keys written by different paths, and the plan crops). Three runs each.
Run from the repo root: `PYTHONPATH=src python <this file>`."""

import torch

from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM


def make_model(attention, index):
    ssa = {"block_size": 16, "top_k": 2, "index": index, "tree_group": 2 if index == "tree" else None}
    cfg = SubquadConfig.from_flavor("debug", position_scheme="rope", attention=attention, ssa=ssa)
    return SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()


def eager_step(model, cache, token):
    return model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


plan = ["graph"] * 100 + ["eager"] * 3 + ["crop-5"] + ["graph"] * 20 + ["crop-30"] + ["graph"] * 10
with torch.no_grad():
    for attention, index in [("ssa", "flat"), ("ssa", "tree"), ("dense", "flat")]:
        for batch in (1, 2):
            for run in range(3):
                model = make_model(attention, index)
                prompt = torch.randint(0, 256, (batch, 150), device="cuda")
                cache = model(prompt, use_cache=True).past_key_values
                reference = model(prompt, use_cache=True).past_key_values
                decoder = GraphedDecoder(model, cache)
                token = torch.randint(0, 256, (batch, 1), device="cuda")
                worst = {"before": 0.0, "after": 0.0}
                phase = "before"
                for action in plan:
                    if action.startswith("crop"):
                        cache.crop(int(action[4:]))
                        reference.crop(int(action[4:]))
                        continue
                    want = eager_step(model, reference, token)
                    got = decoder.step(token) if action == "graph" else eager_step(model, cache, token)
                    diff = float((got.float() - want.float()).abs().max())
                    worst[phase] = max(worst[phase], diff)
                    token = want.argmax(-1, keepdim=True)
                    if action == "eager":
                        phase = "after"
                print(
                    f"{attention}-{index} B{batch} run {run}: largest difference before the eager steps "
                    f"{worst['before']:.4f}, after {worst['after']:.4f}",
                    flush=True,
                )
