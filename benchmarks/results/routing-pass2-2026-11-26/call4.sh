# Call 4: `long` with the beam index at 128K, 1M and 12M on the final code (issue 2's time(12M) / time(1M)
# at most 15; last measured before items 91-92, beam-index-2026-11-25/attention-long-beam-rerun.md).
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 400 python3 benchmarks/attention.py --out $OUT --shape long --index beam --lengths 128k,1m,12m --reps 3 \
  --backward-max-len 0 --flex-max-len 0 --time-budget 300 --tag attention-long-beam > $OUT/call4-long-beam.log 2>&1
tail -8 $OUT/call4-long-beam.log
