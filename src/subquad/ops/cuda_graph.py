"""CUDA graphs recorded through the CUDA driver, their memory in a private pool of torch's allocator.

:class:`GraphedDecoder <subquad.models.subquad.graphed.GraphedDecoder>` first recorded its steps with
``torch.cuda.CUDAGraph``. On the H200 (torch 2.11 + CUDA 13, driver 580) a process that has recorded four
graphs that way replays every graph it holds, old or new, more slowly: the ``small`` model's decode
step at 1M keys 0.252 against 0.243 ms, ~0.34 us more per kernel without PDL
(``benchmarks/results/graph-state-2026-11-26``). Graphs recorded through the driver, or the runtime,
with torch's device allocator routing the capture's allocations to a private pool as torch's capture
does, leave the process fast, however many there are. Which part of torch's capture causes it was not
found: not its instantiation flags, not the device allocator's pool calls, not pinned memory.

:class:`DriverGraph` keeps ``torch.cuda.CUDAGraph``'s interface (``capture_begin(pool,
capture_error_mode)``, ``capture_end``, ``replay``, ``pool``) and leaves out what the decode step does not
use: the CUDA generator's graph-safe state (a random op recorded here fails with torch's "CUDA generator
not in capture mode" error) and pinned host memory allocated during the capture. Allocations during the
capture go to the pool when they are made on the capture stream; the decode step records on one stream.
``DRIVER = False`` makes :func:`new_graph` return torch's graphs (for comparisons), as does a build of
torch or a machine without what the driver path needs.
"""

from __future__ import annotations

import ctypes
import functools

import torch

# Switch read by new_graph at every capture, e.g. to compare both kinds of graph in one process.
DRIVER = True

_CAPTURE_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}  # CUstreamCaptureMode
_AUTO_FREE_ON_LAUNCH = 1  # CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH, as torch instantiates
_POOL_CALLS = ("_cuda_beginAllocateCurrentStreamToPool", "_cuda_endAllocateToPool", "_cuda_releasePool")


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """libcuda with the graph calls typed, or None where it or one of them is missing."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        handle, out = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        signatures = {
            "cuStreamBeginCapture_v2": (handle, ctypes.c_int),
            "cuStreamEndCapture": (handle, out),
            "cuGraphInstantiateWithFlags": (out, handle, ctypes.c_ulonglong),
            "cuGraphLaunch": (handle, handle),
            "cuGraphExecDestroy": (handle,),
            "cuGraphDestroy": (handle,),
            "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


def driver_graphs_available() -> bool:
    """Whether :class:`DriverGraph` can run here: CUDA, libcuda's graph calls, torch's pool calls."""
    return (
        torch.cuda.is_available() and _driver() is not None and all(hasattr(torch._C, n) for n in _POOL_CALLS)
    )


def new_graph() -> DriverGraph | torch.cuda.CUDAGraph:
    """An empty graph to capture into: a :class:`DriverGraph` unless ``DRIVER`` is off or unavailable."""
    return DriverGraph() if DRIVER and driver_graphs_available() else torch.cuda.CUDAGraph()


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: CUresult {result} ({(name.value or b'unknown').decode()})")


class DriverGraph:
    """One CUDA graph, recorded and replayed through the driver (module docstring)."""

    def __init__(self) -> None:
        self._exec: ctypes.c_void_p | None = None
        self._stream: int | None = None  # the capture stream's handle
        self._device: int | None = None
        self._pool: tuple[int, int] | None = None  # set once the pool's use count includes this graph
        self._allocating = False

    def capture_begin(self, pool: tuple[int, int] | None = None, capture_error_mode: str = "global") -> None:
        if capture_error_mode not in _CAPTURE_MODES:
            raise ValueError(
                f"capture_error_mode={capture_error_mode!r}: expected one of {list(_CAPTURE_MODES)}"
            )
        if self._pool is not None:
            raise RuntimeError("this DriverGraph was captured already; make a new one")
        stream = torch.cuda.current_stream()
        if stream.cuda_stream == torch.cuda.default_stream(stream.device).cuda_stream:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream")
        self._stream, self._device = stream.cuda_stream, stream.device.index
        self._pool = tuple(pool) if pool is not None else torch.cuda.graph_pool_handle()
        # Counts this graph as a user of the pool and sends the capture stream's allocations there.
        torch._C._cuda_beginAllocateCurrentStreamToPool(self._device, self._pool)
        self._allocating = True
        try:
            mode = _CAPTURE_MODES[capture_error_mode]
            _check(_driver().cuStreamBeginCapture_v2(self._stream, mode), "cuStreamBeginCapture")
        except BaseException:
            self._end_allocating()
            raise

    def capture_end(self) -> None:
        if not self._allocating:
            raise RuntimeError("capture_end() without a capture_begin() under way")
        graph = ctypes.c_void_p()
        try:
            _check(_driver().cuStreamEndCapture(self._stream, ctypes.byref(graph)), "cuStreamEndCapture")
        finally:
            self._end_allocating()
        try:
            executable, flags = ctypes.c_void_p(), _AUTO_FREE_ON_LAUNCH
            result = _driver().cuGraphInstantiateWithFlags(ctypes.byref(executable), graph, flags)
            _check(result, "cuGraphInstantiateWithFlags")
            self._exec = executable
        finally:
            _driver().cuGraphDestroy(graph)  # the executable does not need it

    def replay(self) -> None:
        if self._exec is None:
            raise RuntimeError("replay() before a successful capture_end()")
        stream = torch.cuda.current_stream(self._device).cuda_stream
        _check(_driver().cuGraphLaunch(self._exec, stream), "cuGraphLaunch")

    def pool(self) -> tuple[int, int]:
        """The memory pool's id, for another capture to share (as ``torch.cuda.CUDAGraph.pool``)."""
        if self._exec is None:
            raise RuntimeError("pool() before a successful capture_end()")
        return self._pool

    def _end_allocating(self) -> None:
        if self._allocating:
            self._allocating = False
            torch._C._cuda_endAllocateToPool(self._device, self._pool)

    def __del__(self) -> None:
        # A launch still in flight finishes first: the driver frees its executable on completion, and the
        # pool is released as torch's own graphs release theirs.
        try:
            self._end_allocating()
            if self._exec is not None:
                _driver().cuGraphExecDestroy(self._exec)
                self._exec = None
            if self._pool is not None:
                torch._C._cuda_releasePool(self._device, self._pool)
                self._pool = None
        except Exception:
            pass  # interpreter shutdown: the modules may be gone
