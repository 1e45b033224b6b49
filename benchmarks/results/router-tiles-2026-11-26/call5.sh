# Call 5 (NOTES item 106): the router (this tree's launch: 128 tokens, 8 warps, 3 stages, cap 128, 64-block
# chunks) against 32-block chunks at caps 80 (three programs an SM) and 128, lists of 64, and 4 stages;
# routing-pass2's ab.py, each variant its own process, picks compared with this tree's launch.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
AB=benchmarks/results/routing-pass2-2026-11-26/ab.py
run() { name=$1; shift; timeout 120 python3 $AB --name $name "$@" 2>&1 | tail -1 | tee -a $OUT/call5.jsonl; }
S=triton_select
N32="--set $S._THRESHOLD_BLOCK_N=32"
run head-1m --length 1m --ref /tmp/ref-1m.pt
run n32-cap80 --length 1m --ref /tmp/ref-1m.pt $N32 --set $S._THRESHOLD_MAX_REGISTERS=80
run n32-cap128 --length 1m --ref /tmp/ref-1m.pt $N32
run n32-cap80-list64 --length 1m --ref /tmp/ref-1m.pt $N32 --set $S._THRESHOLD_MAX_REGISTERS=80 --set $S._THRESHOLD_CAP_PER_K=4
run stages4 --length 1m --ref /tmp/ref-1m.pt --set $S._THRESHOLD_NUM_STAGES=4
run head-1m-2 --length 1m --ref /tmp/ref-1m.pt
run n32-cap80-2 --length 1m --ref /tmp/ref-1m.pt $N32 --set $S._THRESHOLD_MAX_REGISTERS=80
Q="--shape small --length 12m --queries 64k --ref /tmp/ref-small.pt"
run head-small12m $Q
run n32-cap80-small12m $Q $N32 --set $S._THRESHOLD_MAX_REGISTERS=80
