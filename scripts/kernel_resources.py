"""Registers, spills, shared memory and the main loop's instruction mix of the routed attention kernels,
compiled for Hopper (sm_90) on any machine: no GPU needed (Triton's bundled ptxas and cuobjdump).

At launch the JIT specialises integer arguments that are multiples of 16 and 16-byte aligned pointers;
the probe gives the kernel the same hints (every stride of the ``layer-8b`` shape is a multiple of 16),
so the code it compiles is the code that runs there. A change to a kernel's registers or loop length can
be seen here before a GPU call is spent on it (benchmarks/NOTES.md item 91).

    python scripts/kernel_resources.py --kernel forward
    python scripts/kernel_resources.py --kernel backward --maxnreg 128 --stages 2
"""

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from subquad.ops.ssa import triton_routed
from subquad.ops.ssa.triton_attention import _launch_shape, tokens_per_tile

# The layer-8b shape: Hq 32, Hkv 8, D 128, block 64, top_k 16.
GROUP, HEADS_KV, DIM, BLOCK, SLOTS = 4, 8, 128, 64, 16
# Integer arguments that are multiples of 16 at that shape (the others: HKV, group, scales).
MULTIPLES_OF_16 = {"T", "S", "num_blocks", "chunk_start", "chunk_len"}
FLOAT_ARGS = {"scale_log2", "scale"}
FP32_POINTERS = {"LSE_PART", "LSE", "DELTA", "DK_ACC", "DV_ACC"}
INT_POINTERS = {"seg_block", "seg_start", "seg_end", "pair_entry"}


def _kernel(name: str):
    if name == "forward":
        rows, warps = triton_routed._ROUTED_ROWS, triton_routed._ROUTED_NUM_WARPS
        stages, cap = triton_routed._ROUTED_NUM_STAGES, triton_routed._ROUTED_MAX_REGISTERS
        return triton_routed._routed_partial_kernel, rows, warps, stages, cap
    rows, warps = triton_routed._BWD_ROUTED_ROWS, triton_routed._BWD_NUM_WARPS
    return triton_routed._routed_bwd_kernel, rows, warps, triton_routed._BWD_NUM_STAGES, 0


def compile_kernel(name: str, stages: int | None, maxnreg: int | None):
    fn, rows, warps, default_stages, default_cap = _kernel(name)
    q = torch.empty(1, 1, GROUP * HEADS_KV, DIM, device="meta")  # the launch reads shapes only
    constants = _launch_shape(q, q[:, :, :HEADS_KV], HEADS_KV, BLOCK, tokens_per_tile(GROUP, rows))
    constants.update(NUM_SLOTS=SLOTS, CAUSAL=True, FAST_EXP2=True)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg in INT_POINTERS or arg in FP32_POINTERS or arg[0].isupper() and arg not in ("T", "S", "HKV"):
            signature[arg] = "*i32" if arg in INT_POINTERS else "*fp32" if arg in FP32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg.startswith("stride_") or arg in MULTIPLES_OF_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=warps, num_stages=default_stages if stages is None else stages)
    cap = default_cap if maxnreg is None else maxnreg
    if cap:
        options["maxnreg"] = cap
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin, with the binary Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the longest backward-branching range (the kernel's main loop)."""
    lines = [
        (int(addr, 16), op, rest)
        for addr, op, rest in re.findall(
            r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass
        )
    ]
    loops = [(0, 0)]
    for addr, op, rest in lines:
        target = re.match(r"\s*0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(op for addr, op, _ in lines if start <= addr <= end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("forward", "backward"), default="forward")
    parser.add_argument("--stages", type=int, default=None, help="num_stages (default: the launch's)")
    parser.add_argument(
        "--maxnreg", type=int, default=None, help="register cap a thread, 0 for none (default: the launch's)"
    )
    parser.add_argument("--top", type=int, default=12, help="opcodes listed")
    args = parser.parse_args()
    compiled = compile_kernel(args.kernel, args.stages, args.maxnreg)
    usage = _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    ops = loop_opcodes(sass)
    print(
        f"{args.kernel}: {regs} registers, {stack} bytes of stack (spills), "
        f"{compiled.metadata.shared} bytes of shared memory; main loop {sum(ops.values())} instructions"
    )
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
