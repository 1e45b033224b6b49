"""Does a decode graph's replay speed follow its executable, and can the slow state be avoided?

Item 52 (decode-one-capture-h200-2026-11-24) found that `small`'s replayed SSA decode step at 1M takes
~0.247 ms while its graph is among the first three CUDA graphs a process instantiated, ~0.258 ms after.
Here the step is captured with `keep_graph=True`, so its `cudaGraph_t` survives, and the same graph is
launched through several executables, driver calls by ctypes (`libcuda.so.1`):

- `torch`: the decoder's own executable (`CUDAGraph.replay`);
- `flags=F`: a new executable from `cuGraphInstantiateWithFlags(graph, F)`, uploaded, then launched
  (F = 0; 1 auto-free-on-launch, torch's flag; 4 device-launch; 8 node priority);
- `first`: the process's first executable as it is (ordinal 1);
- `update-first`: the same executable, made for a graph captured before `--dummy-graphs` one-kernel
  graphs, then given the current graph by `cuGraphExecUpdate`.

Each variant: `--runs` windows of 40 launches, ms per launch. The raw launches move the position on the
device only (the host plan is not rewritten), within the cache's spare room. Run from the repo root:
`PYTHONPATH=src python <this file> [--dummy-graphs N] [--length L]`."""

import argparse
import ctypes
import gc
import os
import time

import torch

import subquad
from subquad.models import GraphedDecoder, SubquadConfig, SubquadForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1 << 20)
parser.add_argument("--dummy-graphs", type=int, default=4)
parser.add_argument(
    "--dummy-mode",
    default="torch-graph",
    choices=[
        "torch-graph",
        "capture",
        "capture-shared-pool",
        "capture-keep",
        "capture-no-exec",
        "capture-empty",
        "driver",
        "driver-no-exec",
        "runtime",
        "runtime-device-pool",
        "mempool",
        "pinned",
        "empty-cache",
    ],
    help="how each dummy is made: `torch.cuda.graph` (which syncs, collects and empties the allocator's "
    "cache first), torch's capture_begin/end on a side stream without those, a capture by the driver "
    "(cuStreamBeginCapture/EndCapture) instantiated and launched, the same not instantiated, or no graph: "
    "sync, gc.collect and empty_cache only. `capture-shared-pool`: torch's capture, every dummy in one pool; "
    "`runtime`: the capture, instantiation (flags 9, torch's) and launch through libcudart, not the driver; "
    "`mempool`: no graph, the kernel run inside `torch.cuda.use_mem_pool` of a new pool. `capture-keep`: as "
    "`capture`, every dummy kept alive; `capture-no-exec`: as `capture-keep`, never instantiated; "
    "`capture-empty`: as `capture`, nothing captured; `runtime-device-pool`: as `runtime`, inside the device "
    "allocator's allocate-to-pool calls that torch's capture makes; `pinned`: no graph, 1 MiB of pinned host "
    "memory kept",
)
parser.add_argument("--dummy-flags", type=int, default=0, help="instantiation flags of `driver` dummies")
parser.add_argument("--runs", type=int, default=4)
parser.add_argument("--variants", default="torch,first,flags=1,flags=0,flags=4,flags=8,update-first,torch")
args = parser.parse_args()

cuda = ctypes.CDLL("libcuda.so.1")


def check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what}: CUresult {result} ({name.value.decode() if name.value else '?'})")


def check_rt(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what}: cudaError {result}")


def load_cudart() -> ctypes.CDLL:
    """The libcudart torch loaded (its path from this process's maps)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart" in line}
    if not paths:
        raise RuntimeError("no libcudart mapped in this process")
    return ctypes.CDLL(sorted(paths)[0])


def stream_handle() -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def instantiate(graph: int, flags: int) -> ctypes.c_void_p:
    exe = ctypes.c_void_p()
    flag_bits = ctypes.c_ulonglong(flags)
    result = cuda.cuGraphInstantiateWithFlags(ctypes.byref(exe), ctypes.c_void_p(graph), flag_bits)
    check(result, f"cuGraphInstantiateWithFlags({flags})")
    check(cuda.cuGraphUpload(exe, stream_handle()), "cuGraphUpload")
    return exe


def launcher(exe: ctypes.c_void_p):
    def launch() -> None:
        check(cuda.cuGraphLaunch(exe, stream_handle()), "cuGraphLaunch")

    return launch


def timed(launch, runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            launch()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / 40 * 1e3)
    return walls


class KeptGraph(torch.cuda.CUDAGraph):
    """The decoder's graphs keep their cudaGraph_t (instantiated at capture end, as torch does)."""

    def __new__(cls, keep_graph: bool = True):
        return super().__new__(cls, True)

    def __init__(self, keep_graph: bool = True) -> None:
        super().__init__(True)  # the binding's constructor reads keep_graph here, not in __new__

    def capture_end(self) -> None:
        super().capture_end()
        self.instantiate()


def make_dummy(mode: str, x: torch.Tensor, side: torch.cuda.Stream, flags: int) -> None:
    """One unrelated one-kernel graph (or, for `empty-cache`, what `torch.cuda.graph` does before one)."""
    if mode == "torch-graph":
        dummy = KeptGraph()
        with torch.cuda.graph(dummy):
            x.add_(1)
        dummy.replay()
    elif mode.startswith("capture"):
        dummy = RAW_GRAPH(keep_graph=True) if mode == "capture-no-exec" else KeptGraph()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dummy.capture_begin(pool=SHARED_POOL if mode == "capture-shared-pool" else None)
            if mode != "capture-empty":
                x.add_(1)
            dummy.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        if mode != "capture-no-exec":
            dummy.replay()
        if mode in ("capture-keep", "capture-no-exec", "capture-shared-pool"):
            KEPT.append(dummy)
    elif mode in ("driver", "driver-no-exec"):
        handle = ctypes.c_void_p(side.cuda_stream)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            check(cuda.cuStreamBeginCapture_v2(handle, ctypes.c_int(0)), "cuStreamBeginCapture_v2")
            x.add_(1)
            graph = ctypes.c_void_p()
            check(cuda.cuStreamEndCapture(handle, ctypes.byref(graph)), "cuStreamEndCapture")
        if mode == "driver":
            exe = instantiate(graph.value, flags)
            launcher(exe)()
            torch.cuda.synchronize()
            check(cuda.cuGraphExecDestroy(exe), "cuGraphExecDestroy")
        check(cuda.cuGraphDestroy(graph), "cuGraphDestroy")
    elif mode.startswith("runtime"):
        handle = ctypes.c_void_p(side.cuda_stream)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(side):
            if mode == "runtime-device-pool":  # the device allocator's half of torch's capture_begin
                torch._C._cuda_beginAllocateCurrentStreamToPool(torch.cuda.current_device(), pool)
            check_rt(cudart.cudaStreamBeginCapture(handle, ctypes.c_int(0)), "cudaStreamBeginCapture")
            x.add_(1)
            graph = ctypes.c_void_p()
            check_rt(cudart.cudaStreamEndCapture(handle, ctypes.byref(graph)), "cudaStreamEndCapture")
            if mode == "runtime-device-pool":
                torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
                torch._C._cuda_releasePool(torch.cuda.current_device(), pool)
        exe = ctypes.c_void_p()
        check_rt(
            cudart.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(9)),
            "instantiate",
        )
        check_rt(
            cudart.cudaGraphLaunch(exe, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "launch"
        )
        torch.cuda.synchronize()
        check_rt(cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")
        check_rt(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
    elif mode == "pinned":
        KEPT.append(torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True))
    elif mode == "mempool":
        with torch.cuda.use_mem_pool(torch.cuda.MemPool()):
            x.add_(1)
        torch.cuda.synchronize()
    else:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()


torch.manual_seed(0)
cfg = SubquadConfig.from_flavor("small", attention="ssa", position_scheme="rope", ssa={"index": "tree"})
model = SubquadForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
cache = subquad.SSACache(cfg, max_length=args.length + 4096)
for i in range(cfg.num_hidden_layers):
    kv = torch.randn(2, 1, args.length, cfg.num_key_value_heads, cfg.head_dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)  # fmt: skip
    cache.layer(i).append(kv[0], kv[1])
    del kv
RAW_GRAPH, KEPT = torch.cuda.CUDAGraph, []
torch.cuda.CUDAGraph = KeptGraph  # the decoder captures through torch.cuda.CUDAGraph
decoder = GraphedDecoder(model, cache)
token = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda", generator=gen)
with torch.no_grad():
    for _ in range(8):
        decoder.step(token)  # the eager step, the capture, replays
    first = decoder._pieces  # executable ordinal 1 (no graph came before it)
    x = torch.ones(1024, device="cuda")
    cudart = load_cudart() if args.dummy_mode.startswith("runtime") else None
    SHARED_POOL = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    for _ in range(args.dummy_graphs):
        make_dummy(args.dummy_mode, x, side, args.dummy_flags)
    decoder.invalidate()
    for _ in range(8):
        decoder.step(token)  # invalidated: re-captures, ordinal dummy_graphs + 2
    assert decoder.captures == 2 and len(decoder._pieces) == 1, (decoder.captures, len(decoder._pieces))
    graph = decoder._pieces[0][0]
    raw = graph.raw_cuda_graph()
    threads = len(os.listdir("/proc/self/task"))
    cpu0 = time.process_time()
    time.sleep(0.5)
    idle_cpu = (time.process_time() - cpu0) / 0.5
    print(f"host threads {threads}, CPU time while sleeping 0.5 s: {idle_cpu:.2f} cores", flush=True)
    dummies = f"dummies {args.dummy_graphs} ({args.dummy_mode}, flags {args.dummy_flags})"
    print(f"length {args.length}, {dummies}, captures {decoder.captures}", flush=True)
    made = 0
    for variant in args.variants.split(","):
        try:
            if variant == "torch":
                launch = graph.replay
            elif variant == "torch-after-empty-cache":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                launch = graph.replay
            elif variant.startswith("flags="):
                launch = launcher(instantiate(raw, int(variant.split("=")[1])))
                made += 1
            elif variant == "first":
                launch = first[0][0].replay
            elif variant == "update-first":
                exe = ctypes.c_void_p(first[0][0].raw_cuda_graph_exec())
                info = (ctypes.c_byte * 64)()  # CUgraphExecUpdateResultInfo: result, error node, from node
                check(cuda.cuGraphExecUpdate_v2(exe, ctypes.c_void_p(raw), ctypes.byref(info)),
                      "cuGraphExecUpdate_v2")  # fmt: skip
                launch = launcher(exe)
            else:
                raise ValueError(f"--variants: unknown {variant!r}")
            walls = timed(launch, args.runs)
            print(f"{variant:>14} (executables made here so far {made}): "
                  + " ".join(f"{w:.4f}" for w in walls), flush=True)  # fmt: skip
        except Exception as error:  # report and go on with the next variant
            print(f"{variant:>14}: failed: {error}", flush=True)
