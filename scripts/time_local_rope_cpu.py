"""Time the PyTorch ``local_rope`` attention path (what a CPU model runs) for one nano-shaped layer.

python scripts/time_local_rope_cpu.py --length 16k [--chunk-elements 2097152]
"""

import argparse
import time

import torch

import subquad.models.sparse_torch as sparse_torch
import subquad.ops.ssa.naive as naive
from subquad import SSAConfig, select_blocks
from subquad.benchmark import parse_length
from subquad.models.subquad.modeling import SubquadRotary

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--length", default="16k")
parser.add_argument("--chunk-elements", type=int, default=None, help="override the CPU chunk size")
args = parser.parse_args()
if args.chunk_elements:
    naive._CPU_CHUNK_ELEMENTS = args.chunk_elements
torch.manual_seed(0)
length = parse_length(args.length)
q, k, v = torch.randn(1, length, 5, 64), torch.randn(1, length, 1, 64), torch.randn(1, length, 1, 64)
config = SSAConfig(block_size=64, top_k=16)
block_idx = select_blocks(q, k, config).block_idx
with torch.no_grad():
    start = time.perf_counter()
    sparse_torch.sparse_attention_torch(
        q, k, v, block_idx, 64, 0.125, local_rotary=(SubquadRotary(64, 10000.0), 1, 2)
    )
print(f"T={length} chunk={naive.chunk_elements(q.device)}: {time.perf_counter() - start:.2f} s")
