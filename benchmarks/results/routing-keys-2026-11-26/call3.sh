# Call 3: the layer-8b sweep on the final router (NOTES item 95), then `long` with the beam index at
# 128K, 1M and 12M (time(12M) / time(1M)).
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
timeout 330 python3 benchmarks/attention.py --shape layer-8b --top-k 16 --time-budget 300 \
  --tag attention-layer-8b --out $OUT > $OUT/call3-sweep.log 2>&1
timeout 240 python3 benchmarks/attention.py --shape long --index beam --lengths 128k,1m,12m --reps 3 \
  --backward-max-len 0 --flex-max-len 0 --time-budget 300 --tag attention-long-beam --out $OUT \
  > $OUT/call3-long-beam.log 2>&1
grep -h "N=" $OUT/call3-*.log
