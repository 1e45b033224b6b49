"""Per-token overhead of one decode step of a Subquad model, measured on any device (CPU included).

Prefills ``--context`` random tokens into an :class:`subquad.SSACache` with the SSA model, then for the
SSA model and its dense twin (same weights, ``attention="dense"``, decoding against the same cache)
reports, for one decode step:

* aten ops dispatched (all, and "kernels": ops that are not views or metadata), per step and per layer,
  and how many of the kernels are the attention itself (on the CPU the PyTorch stand-ins of the decode
  kernel and SDPA; a Triton launch is not an aten op and is not counted);
* host-device syncs: ``item()`` / ``int(t)`` / ``bool(t)`` (``aten::_local_scalar_dense``),
  ``tolist()`` calls, host tensors copied to the device (``torch.tensor(list, device=...)``), and
  ops with data-dependent output shapes (``nonzero``, boolean-mask indexing, ``masked_select``);
* wall ms per step (median over ``--steps`` steps, after warm-up), and that minus the self time of the
  matrix products in one profiled step (approximate: the rest is small ops, dispatch and Python);
* optionally the top aten ops by CPU time (``--table``) and the top Python functions (``--cprofile``).

On a GPU every sync drains the pipeline (~10-50 us) and every small kernel costs ~5-10 us of launch,
so the op and sync counts predict the overhead-bound decode latency there.

CPU (a few seconds to a minute on 2 cores):
    python scripts/profile_decode.py --flavor small --context 4096
    python scripts/profile_decode.py --flavor small --context 4096 --table --cprofile
GPU (H200):
    PYTHONPATH=src python scripts/profile_decode.py --device cuda --flavor small --context 131072
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import subquad  # noqa: E402
from subquad.models import SubquadConfig, SubquadForCausalLM, prefill  # noqa: E402
from subquad.models.subquad import modeling  # noqa: E402
from subquad.ops.ssa import triton_decode  # noqa: E402

# aten ops that only make views or read metadata: no kernel on a GPU.
_VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "transpose", "t", "permute",
    "expand", "unsqueeze", "squeeze", "alias", "detach", "split", "split_with_sizes", "unbind",
    "unflatten", "flatten", "view_as", "expand_as", "narrow", "diagonal", "lift_fresh", "chunk",
    "_reshape_alias", "empty", "empty_like", "empty_strided", "unfold",
}  # fmt: skip
_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched, by name, and notes boolean-mask indexing. Ops dispatched inside
    the attention computation itself (see ``attention_section``) are also counted apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.attention_ops: Counter[str] = Counter()
        self.in_attention = False
        self.bool_index = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if self.in_attention:
            self.attention_ops[name] += 1
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for t in a
        ):
            self.bool_index += 1
        return func(*args, **(kwargs or {}))


class HostCalls:
    """Counts ``Tensor.tolist`` and host-to-device ``torch.tensor(..., device=...)`` calls while active."""

    def __init__(self) -> None:
        self.tolist = 0
        self.to_device = 0

    def __enter__(self):
        self._tolist, self._tensor = torch.Tensor.tolist, torch.tensor
        counter = self

        def tolist(t, *a, **k):
            counter.tolist += 1
            return counter._tolist(t, *a, **k)

        def tensor(data, *a, **k):
            if not isinstance(data, torch.Tensor) and k.get("device") is not None:
                counter.to_device += 1
            return counter._tensor(data, *a, **k)

        torch.Tensor.tolist = tolist
        torch.tensor = tensor
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.tensor = self._tolist, self._tensor


@contextmanager
def attention_section(counter: OpCounter):
    """Marks the ops of the attention kernels' stand-ins on the CPU (the SSA decode's PyTorch reference,
    ``sparse_decode_naive``, and SDPA): on CUDA each is one or two kernel launches instead."""
    originals = (triton_decode.sparse_decode_naive, modeling.F.scaled_dot_product_attention)

    def marked(fn):
        def call(*args, **kwargs):
            counter.in_attention = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.in_attention = False

        return call

    triton_decode.sparse_decode_naive = marked(originals[0])
    functional = vars(torch.nn.functional)
    modeling.F = SimpleNamespace(**{**functional, "scaled_dot_product_attention": marked(originals[1])})
    try:
        yield
    finally:
        triton_decode.sparse_decode_naive = originals[0]
        modeling.F = torch.nn.functional


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--flavor", default="small")
    p.add_argument("--context", type=int, default=4096, help="tokens prefilled before decoding")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--index", default="tree", choices=["flat", "tree"], help="SSA router")
    p.add_argument("--attention", default="both", choices=["ssa", "dense", "both"])
    p.add_argument("--steps", type=int, default=10, help="timed decode steps (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--table", action="store_true", help="print the top aten ops by CPU time")
    p.add_argument("--cprofile", action="store_true", help="print the top Python functions")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    return args


def build(args, device):
    """The SSA model and its dense twin (same weights), as ``benchmarks/decode.py`` builds them."""
    torch.manual_seed(0)
    cfg = SubquadConfig.from_flavor(args.flavor, position_scheme="rope", ssa={"index": args.index})
    sparse = SubquadForCausalLM(cfg).to(device=device, dtype=args.dtype).eval()
    dense_cfg = SubquadConfig.from_flavor(args.flavor, attention="dense", position_scheme="rope")
    dense = SubquadForCausalLM(dense_cfg).to(device=device, dtype=args.dtype).eval()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, cache, token, args, device) -> dict:
    """Op/sync counts of one step and the median wall time of ``args.steps`` steps (cache restored)."""
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for _ in range(3):
            model(token, past_key_values=cache)
        counter = OpCounter()
        with HostCalls() as host, attention_section(counter), counter:
            model(token, past_key_values=cache)
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            model(token, past_key_values=cache)
            sync(device)
            times.append(time.perf_counter() - t0)
        # Host time of one step split into the big matrix products (weights, dense attention) and
        # everything else (small ops, dispatch, Python): the latter is what a GPU step pays per launch.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(token, past_key_values=cache)
        averages = prof.key_averages()
        self_us = {e.key: e.self_cpu_time_total for e in averages}
        gemm_ms = sum(us for key, us in self_us.items() if key in _GEMM_OPS) / 1e3
        table = averages.table(sort_by="self_cpu_time_total", row_limit=25) if args.table else None
        stats = None
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            model(token, past_key_values=cache)
            profiler.disable()
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
            stats = buf.getvalue()
    cache.crop(-(args.steps + 5 + int(args.cprofile)))
    ops = counter.ops
    total = sum(ops.values())
    kernels = sum(n for name, n in ops.items() if name not in _VIEW_OPS)
    attention = sum(n for name, n in counter.attention_ops.items() if name not in _VIEW_OPS)
    syncs = {name: ops[name] for name in _SYNC_OPS if ops[name]}
    return dict(
        ops_per_step=total,
        kernel_ops_per_step=kernels,
        kernel_ops_per_layer=round(kernels / layers, 1),
        attention_kernel_ops_per_layer=round(attention / layers, 1),
        kernel_ops_outside_attention=kernels - attention,
        scalar_reads=ops["_local_scalar_dense"],
        data_dependent_ops=syncs,
        bool_mask_indexing=counter.bool_index,
        tolist_calls=host.tolist,
        host_tensors_to_device=host.to_device,
        ms_per_step=1e3 * statistics.median(times),
        ms_per_step_without_gemms=1e3 * statistics.median(times) - gemm_ms,
        top_kernel_ops=dict(Counter({n: c for n, c in ops.items() if n not in _VIEW_OPS}).most_common(15)),
        _table=table,
        _cprofile=stats,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sparse, dense = build(args, device)
    cfg = sparse.config
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device=device)
    cache = subquad.SSACache(cfg, max_length=args.context + 256)
    with torch.no_grad():
        prefill(sparse, ids, chunk_size=min(args.context, 2048), cache=cache)
    token = torch.randint(0, cfg.vocab_size, (args.batch, 1), device=device)
    results = {}
    for name, model in (("ssa", sparse), ("dense", dense)):
        if args.attention not in (name, "both"):
            continue
        row = measure(model, cache, token, args, device)
        table, stats = row.pop("_table"), row.pop("_cprofile")
        results[name] = row
        print(f"== {name}: {args.flavor}, context {args.context}, batch {args.batch}, {args.dtype}, {device}")
        print(json.dumps(row, indent=1))
        if table:
            print(table)
        if stats:
            print(stats)
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps(dict(args=settings, **results), indent=1))
    return results


if __name__ == "__main__":
    main()
