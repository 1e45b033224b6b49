# Call 3: the layer-8b sweep on the final code, for the committed benchmarks/results/attention-layer-8b.*;
# then the `small` SSA prefill at 1M, 4M and 12M after a 4M prefill that compiles the long-length kernels
# (as graph-state-2026-11-26/call13.sh, without the dense twin, whose attention has no router).
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 300 python3 benchmarks/attention.py --shape layer-8b --top-k 16 --time-budget 300 \
  --tag attention-layer-8b --out $OUT > $OUT/call3-sweep.log 2>&1
tail -12 $OUT/call3-sweep.log
mkdir -p $OUT/warm $OUT/prefill
( time timeout 60 python3 benchmarks/decode.py --device cuda --only prefill --skip-dense --prefill-lengths 4194304 --out $OUT/warm ) > $OUT/call3-warm.log 2>&1
grep -E "\| prefill \||real" $OUT/call3-warm.log
( time timeout 180 python3 benchmarks/decode.py --device cuda --only prefill --skip-dense --prefill-lengths 1048576 4194304 12582912 --out $OUT/prefill ) > $OUT/call3-prefill.log 2>&1
grep -E "\| prefill \||real" $OUT/call3-prefill.log
