"""Registers, spills, shared memory and the longest loop's instruction mix of the routed attention
kernels and the threshold router, compiled for Hopper (sm_90) on any machine: no GPU needed (Triton's
bundled ptxas and cuobjdump).

At launch the JIT specialises integer arguments that are multiples of 16 and 16-byte aligned pointers;
the probe gives the kernel the same hints (every stride of the ``layer-8b`` shape is a multiple of 16),
so the code it compiles is the code that runs there. A change to a kernel's registers or loop length can
be seen here before a GPU call is spent on it (benchmarks/NOTES.md items 91-92). ``--loops`` lists every
loop (the threshold router has one per pass and range of chunks, and its extraction steps inside them).

    python scripts/kernel_resources.py --kernel forward
    python scripts/kernel_resources.py --kernel backward --maxnreg 128 --stages 2
    python scripts/kernel_resources.py --kernel threshold --loops
    python scripts/kernel_resources.py --kernel threshold --dim 256   # the beam's level-2 nodes
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

from subquad.ops.ssa import triton_routed, triton_select
from subquad.ops.ssa.config import SSAConfig
from subquad.ops.ssa.triton_attention import _launch_shape, tokens_per_tile

# The layer-8b shape: Hq 32, Hkv 8, D 128, block 64, top_k 16.
GROUP, HEADS_KV, DIM, BLOCK, SLOTS = 4, 8, 128, 64, 16
# Integer arguments that are multiples of 16 at that shape (the others: HKV, group, scales).
MULTIPLES_OF_16 = {
    "T",
    "S",
    "num_blocks",
    "num_summaries",
    "block_size",
    "top_k",
    "chunk_start",
    "chunk_len",
    "tile_start",
    "list_rows",
}
FLOAT_ARGS = {"scale_log2", "scale"}
FP32_POINTERS = {"LSE_PART", "LSE", "DELTA", "DK_ACC", "DV_ACC"}
INT_POINTERS = {"seg_block", "seg_start", "seg_end", "pair_entry", "COUNT", "OUT"}
INT64_POINTERS = {"LISTS"}


def _kernel(name: str, dim: int):
    """The kernel, its compile-time constants and its launch options (num_warps, num_stages, maxnreg)."""
    if name == "threshold":  # the first launch of a full first pass, bf16 inputs, one summary a block
        constants, options, _ = triton_select._threshold_launch(dim, SSAConfig(), 1, True, False)
        constants.update(KEEP_BEST=False, REPAIR=False, IN_PLACE=True)
        return triton_select._threshold_topk_kernel, constants, options
    q = torch.empty(1, 1, GROUP * HEADS_KV, dim, device="meta")  # the launch reads shapes only
    if name == "forward":
        rows, warps = triton_routed._ROUTED_ROWS, triton_routed._ROUTED_NUM_WARPS
        stages, cap = triton_routed._ROUTED_NUM_STAGES, triton_routed._ROUTED_MAX_REGISTERS
        fn = triton_routed._routed_partial_kernel
    else:
        rows, warps = triton_routed._BWD_ROUTED_ROWS, triton_routed._BWD_NUM_WARPS
        stages, cap = triton_routed._BWD_NUM_STAGES, None
        fn = triton_routed._routed_bwd_kernel
    constants = _launch_shape(q, q[:, :, :HEADS_KV], HEADS_KV, BLOCK, tokens_per_tile(GROUP, rows))
    constants.update(NUM_SLOTS=SLOTS, CAUSAL=True, FAST_EXP2=True)
    return fn, constants, dict(num_warps=warps, num_stages=stages, maxnreg=cap or None)


def compile_kernel(name: str, stages: int | None, maxnreg: int | None, dim: int = DIM):
    fn, constants, options = _kernel(name, dim)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg[0].isupper() and arg not in ("T", "S", "HKV") or arg in INT_POINTERS:
            pointers = ((INT_POINTERS, "*i32"), (INT64_POINTERS, "*i64"), (FP32_POINTERS, "*fp32"))
            signature[arg] = next((kind for names, kind in pointers if arg in names), "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg.startswith("stride_") or arg in MULTIPLES_OF_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    if stages is not None:
        options["num_stages"] = stages
    if maxnreg is not None:
        options["maxnreg"] = maxnreg or None
    options = {key: value for key, value in options.items() if value is not None}
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin, with the binary Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """Each backward-branching range of the SASS (a loop; nested ones included): start and end
    addresses and its opcodes, in the order of the branches."""
    lines = [
        (int(addr, 16), op, rest)
        for addr, op, rest in re.findall(
            r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass
        )
    ]
    found = []
    for addr, op, rest in lines:
        target = re.match(r"\s*0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            found.append((start, addr, collections.Counter(o for a, o, _ in lines if start <= a <= addr)))
    return found


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the longest loop (the routed kernels' main loop)."""
    return max(loops(sass), key=lambda loop: loop[1] - loop[0], default=(0, 0, collections.Counter()))[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("forward", "backward", "threshold"), default="forward")
    parser.add_argument("--stages", type=int, default=None, help="num_stages (default: the launch's)")
    parser.add_argument(
        "--maxnreg", type=int, default=None, help="register cap a thread, 0 for none (default: the launch's)"
    )
    parser.add_argument("--dim", type=int, default=DIM, help="head dim (default: layer-8b's)")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed")
    parser.add_argument("--loops", action="store_true", help="list every loop, not only the longest")
    args = parser.parse_args()
    compiled = compile_kernel(args.kernel, args.stages, args.maxnreg, args.dim)
    usage = _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    ops = loop_opcodes(sass)
    print(
        f"{args.kernel}: {regs} registers, {stack} bytes of stack (spills), "
        f"{compiled.metadata.shared} bytes of shared memory; longest loop {sum(ops.values())} instructions"
    )
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
    if args.loops:
        for start, end, loop_ops in loops(sass):
            top = ", ".join(f"{op} {n}" for op, n in loop_ops.most_common(args.top))
            print(f"loop {start:#x}-{end:#x}: {sum(loop_ops.values())} instructions; {top}")


if __name__ == "__main__":
    main()
