"""Programmatic dependent launch (PDL) for the decode step's kernels (Hopper and newer).

A graphed decode step of the ``small`` model is a chain of ~150 kernels of 1-5 us each. Without PDL a
kernel's programs start only once the kernel before it has finished, so every link of the chain pays
the launch and the first loads' latency in full. A kernel launched with PDL (``launch_pdl=True``)
starts while the one before it still runs and waits on the device (``griddepcontrol.wait``) until
that kernel has finished and its writes are visible. The rules every kernel here keeps:

* before its wait it only loads what the kernel just before it cannot be writing: what no kernel of a
  step writes (model weights: the decode GEMVs start streaming theirs this way; the tree router's kept
  group bounds, which PyTorch ops update, and a PyTorch kernel lets the next one start only when it has
  finished; the host-built sink and local slots), or what only kernels at least two launches back
  write (they finished before this one could start, see the next rule: the token's position, its
  rotary table rows, the open block's earlier keys, the summaries of complete blocks). It stores nothing;
* right after its wait it lets the next kernel launch (``griddepcontrol.launch_dependents``). At that
  point every kernel before it has finished, so the next kernel's weight loads overlap this one alone.

A kernel that waits has finished only after everything before it has, so the chain stays ordered for
kernels launched without PDL as well (PyTorch's, which start once their predecessor is done). The same
kernels run unchanged without PDL (``ENABLED = False``, older GPUs, the Triton interpreter), where the
wait and the launch are compiled out.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Off switch, e.g. for measuring a step without PDL in the same process; read at every launch (a
# captured CUDA graph keeps the launches it recorded).
ENABLED = True


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA of compute capability 9.0 or newer, compiled
    (not ``TRITON_INTERPRET=1``), and :data:`ENABLED`."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel that calls :func:`wait`: its ``PDL`` constexpr and Triton's
    ``launch_pdl`` option, both from :func:`enabled`."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch (module docstring)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
