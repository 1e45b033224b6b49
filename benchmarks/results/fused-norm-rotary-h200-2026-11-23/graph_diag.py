"""Scratch: per-step |graph - eager| of test_cuda_graph_replays_equal_eager_steps[ssa-tree-B1], with the
PyTorch norm/rotary and with the kernels."""

import sys
import zlib

import torch

sys.path.insert(0, "tests/models")
from test_graphed import eager_step, make_model, prefilled  # noqa: E402

from subquad.models import GraphedDecoder  # noqa: E402
from subquad.ops import fused  # noqa: E402

KERNELS = (fused.rms_norm, fused.rotate)
for mode in ("unfused", "fused", "norm-only", "rotary-only"):
    fused.rms_norm, fused.rotate = KERNELS
    if mode in ("unfused", "rotary-only"):
        fused.rms_norm = fused.rms_norm_reference
    if mode in ("unfused", "norm-only"):
        fused.rotate = fused.rotate_reference
    for batch in (1,):
        test = f"tests/models/test_graphed.py::test_cuda_graph_replays_equal_eager_steps[ssa-tree-B{batch}]"
        torch.manual_seed(zlib.crc32(test.encode()))  # the test's seed (tests/conftest.py)
        model = make_model("ssa", "tree", device="cuda", dtype=torch.bfloat16)
        prompt = torch.randint(0, 256, (batch, 150), device="cuda")
        cache, reference = prefilled(model, prompt), prefilled(model, prompt)
        decoder = GraphedDecoder(model, cache)
        token = torch.randint(0, 256, (batch, 1), device="cuda")
        plan = ["graph"] * 100 + ["eager"] * 3 + ["crop-5"] + ["graph"] * 20 + ["crop-30"] + ["graph"] * 10
        diffs = []
        for i, action in enumerate(plan):
            if action.startswith("crop"):
                cache.crop(int(action[4:]))
                reference.crop(int(action[4:]))
                continue
            want = eager_step(model, reference, token)
            got = decoder.step(token) if action == "graph" else eager_step(model, cache, token)
            diffs.append(((got.float() - want.float()).abs().max().item(), i, action))
            token = want.argmax(-1, keepdim=True)
        big = [d for d in diffs if d[0] > 0.02]
        worst = max(diffs)
        print(
            f"{mode} B{batch}: max {worst[0]:.4f} at step {worst[1]}; steps over 0.02: {big[:12]}", flush=True
        )
