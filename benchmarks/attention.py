"""SSA attention benchmark (same as ``subquad bench``).

GPU (H200), full sweeps as committed under benchmarks/results/:
    PYTHONPATH=src python benchmarks/attention.py --shape layer-8b --top-k 16,64,240
    PYTHONPATH=src python benchmarks/attention.py --shape long --index tree --lengths 1m,2m,4m,8m,12m
CPU (small lengths, torch reference path):
    python benchmarks/attention.py --lengths 1k,2k --reps 1
"""

import sys

from subquad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
