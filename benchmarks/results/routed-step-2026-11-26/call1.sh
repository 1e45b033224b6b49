# Call 1: routing beside attention on two streams (overlap.py), chunks of 128K and 256K queries at 1M.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
D=benchmarks/results/routed-step-2026-11-26
for c in 128k 256k; do
  timeout 250 python3 $D/overlap.py --length 1m --chunk $c > $OUT/call1-chunk$c.log 2>&1; echo "chunk $c"; tail -8 $OUT/call1-chunk$c.log
done
