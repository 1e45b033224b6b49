"""Where the time of one SSA attention call goes: GPU time per kernel under ``torch.profiler``.

``subquad.ssa_attention`` on random inputs of the ``layer-8b`` shape (B=1, Hq 32, Hkv 8, D 128, bf16,
causal, default config), forward or forward+backward, as ``benchmarks/attention.py`` times it. Prints
the total GPU time of one call and the kernels that take it (summed over launches, most first), so a
change can be aimed at the largest item; ``--gaps N`` adds the GPU's idle time between the call's
kernels and its N largest gaps (host syncs, launch-bound glue). ``--set MODULE.NAME=VALUE`` changes a
module constant of ``subquad.ops.ssa`` before the run (A/B of launch knobs and code paths in one
process). ``--phase select`` or ``--phase attention`` profiles one of the two phases the benchmark times
apart (forward only): the routing alone, or the attention given that selection (checks included).

GPU:  PYTHONPATH=src python scripts/profile_attention.py --length 128k --backward
      PYTHONPATH=src python scripts/profile_attention.py --length 1m
      PYTHONPATH=src python scripts/profile_attention.py --length 1m --phase attention --gaps 5
      PYTHONPATH=src python scripts/profile_attention.py --length 128k --backward \
          --set triton_routed._FIXED_ROWS=128
"""

import argparse
import importlib

import torch

import subquad
from subquad.benchmark import median_timer, parse_length


def _apply(settings: list[str]) -> None:
    for setting in settings:
        name, _, value = setting.partition("=")
        module_name, _, attr = name.rpartition(".")
        if not module_name or not value:
            raise SystemExit(f"--set {setting!r}: expected MODULE.NAME=VALUE, e.g. triton_routed._X=1")
        module = importlib.import_module(f"subquad.ops.ssa.{module_name}")
        if not hasattr(module, attr):
            raise SystemExit(f"--set {setting!r}: subquad.ops.ssa.{module_name} has no {attr}")
        old = getattr(module, attr)
        setattr(module, attr, type(old)(int(value)) if isinstance(old, (bool, int)) else type(old)(value))
        print(f"set {module_name}.{attr} = {getattr(module, attr)!r} (was {old!r})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", default="128k")
    parser.add_argument("--backward", action="store_true", help="forward + backward (default: forward)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE")
    parser.add_argument("--gaps", type=int, default=0, help="list this many of the largest idle gaps")
    parser.add_argument(
        "--phase",
        choices=("call", "select", "attention"),
        default="call",
        help="one call that routes itself (default), or one of the phases the benchmark times apart",
    )
    args = parser.parse_args()
    if args.backward and args.phase != "call":
        parser.error(f"--phase {args.phase}: the phases are timed forward only; drop --backward")
    _apply(args.set)
    n = parse_length(args.length)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
    v = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
    grad_out = torch.randn_like(q)
    config = subquad.SSAConfig()

    selection = subquad.select_blocks(q, k, config) if args.phase == "attention" else None

    def call():
        if args.phase == "select":
            subquad.select_blocks(q, k, config)
        elif args.phase == "attention":  # as benchmarks/attention.py times its attention phase
            with torch.no_grad():
                subquad.ssa_attention(q, k, v, config=config, selection=selection)
        elif args.backward:  # gradients returned, not accumulated into .grad (as benchmarks/attention.py)
            torch.autograd.grad(subquad.ssa_attention(q, k, v, config=config), (q, k, v), grad_out)
        else:
            with torch.no_grad():
                subquad.ssa_attention(q, k, v, config=config)

    ms = median_timer(torch.device("cuda"), warmup=2, reps=5)(call)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) / 1e3
    mode = "forward+backward" if args.backward else "forward" if args.phase == "call" else args.phase
    print(f"{mode} N={n}: {ms:.1f} ms per call (median of 5); profiled call: {total:.1f} ms of kernels")
    for e in kernels[: args.top]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:6d} x  {e.key[:100]}")
    if args.gaps:
        _print_gaps(prof, args.gaps)


def _print_gaps(prof, top: int) -> None:
    """Where the GPU sat idle between the call's kernels (host syncs, launch-bound glue), largest first,
    with the kernels on either side."""
    on_gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sorted((e for e in on_gpu if e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    if not launches:
        return
    gaps, end = [], launches[0].time_range.end
    for before, after in zip(launches, launches[1:]):
        end = max(end, before.time_range.end)
        if after.time_range.start > end:
            gaps.append((after.time_range.start - end, before.name, after.name))
    span = (max(e.time_range.end for e in launches) - launches[0].time_range.start) / 1e3
    idle = sum(g for g, _, _ in gaps) / 1e3
    print(f"kernel span {span:.1f} ms, idle between kernels {idle:.1f} ms in {len(gaps)} gaps; largest:")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap / 1e3:6.2f} ms  after {before[:50]}  before {after[:50]}")


if __name__ == "__main__":
    main()
