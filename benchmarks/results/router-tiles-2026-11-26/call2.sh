# Call 2 (NOTES item 104): the new launch (128 tokens, 8 warps, cap 128 for one summary a block) in this
# tree against the last commit's (ab_base/src): the router alone at layer-8b 1M (picks compared), nano
# `max4` 1M (sub-block path, unchanged launch; and 8 warps there), `long` + beam as one call at 1M and 12M
# (the beam's 256-wide level-2 nodes take 8 warps too); the 1M select phase and forward profiles; the GPU
# tests of the routing and attention kernels.
export OUT PYTHONUNBUFFERED=1
R=benchmarks/results
AB=$R/routing-pass2-2026-11-26/ab.py
LONG=$R/routing-steps-2026-11-26/long_ab.py
ab() { name=$1; src=$2; shift 2; PYTHONPATH=$src timeout 120 python3 $AB --name $name "$@" 2>&1 | tail -1 | tee -a $OUT/call2.jsonl; }
lab() { src=$1; shift; PYTHONPATH=$src timeout 150 python3 $LONG "$@" 2>&1 | tail -1 | sed "s|^|$src |" | tee -a $OUT/call2.jsonl; }
ab base-1m ab_base/src --length 1m --ref /tmp/ref-1m.pt
ab new-1m src --length 1m --ref /tmp/ref-1m.pt
N="--shape nano --sub-block 4 --length 1m --ref /tmp/ref-nano.pt"
ab base-nano-max4 ab_base/src $N
ab new-nano-max4 src $N
ab new-nano-max4-w8 src $N --set triton_select._THRESHOLD_SUBS_NUM_WARPS=8
lab ab_base/src --length 1m --index beam
lab src --length 1m --index beam
lab ab_base/src --length 12m --index beam
lab src --length 12m --index beam
P=scripts/profile_attention.py
PYTHONPATH=src timeout 150 python3 $P --top 12 --length 1m --phase select > $OUT/call2-select1m.log 2>&1
PYTHONPATH=src timeout 150 python3 $P --top 12 --length 1m > $OUT/call2-fwd1m.log 2>&1
grep -E "per call|_threshold" $OUT/call2-select1m.log $OUT/call2-fwd1m.log
PYTHONPATH=src timeout 280 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py > $OUT/call2-tests.txt 2>&1
tail -1 $OUT/call2-tests.txt
