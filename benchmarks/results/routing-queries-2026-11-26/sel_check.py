"""Picks of one tree against another's: ``select_blocks`` at the layer-8b shape on seeded random inputs,
saved by the first tree (``save PATH``) and compared by the next (``compare PATH``): rows that differ."""

import sys

import torch

import subquad
from subquad.benchmark import parse_length

mode, path, length = sys.argv[1], sys.argv[2], parse_length(sys.argv[3])
torch.manual_seed(0)
q = torch.randn(1, length, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, length, 8, 128, device="cuda", dtype=torch.bfloat16)
picks = subquad.select_blocks(q, k, subquad.SSAConfig()).block_idx
if mode == "save":
    torch.save(picks.cpu(), path)
    print(f"{length}: saved {tuple(picks.shape)}")
else:
    want = torch.load(path).cuda()
    rows = int((picks != want).any(-1).sum())
    print(f"{length}: {rows} of {picks.shape[0] * picks.shape[1] * picks.shape[2]} rows differ")
