"""A/B (scratch): benchmarks/decode.py with the PyTorch RMSNorm/rotary (``unfused``) or the kernels."""

import runpy
import sys

from subquad.ops import fused

if sys.argv[1] == "unfused":
    fused.rms_norm = fused.rms_norm_reference
    fused.rotate = fused.rotate_reference
sys.argv = ["benchmarks/decode.py"] + sys.argv[2:]
runpy.run_path("benchmarks/decode.py", run_name="__main__")
