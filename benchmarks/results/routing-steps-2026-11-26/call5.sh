# Call 5: the threshold kernel's register cap only for head dims up to 128 (the beam's level-2 nodes,
# 256 wide, spilled 288 bytes at the cap with one program an SM anyway): `long` + beam as one call at 1M
# and 12M against a710349 (ab_base/src); the GPU routing tests; the `long` beam sweep.
export OUT PYTHONUNBUFFERED=1
R=benchmarks/results/routing-steps-2026-11-26
ab() { src=$1; shift; PYTHONPATH=$src timeout 150 python3 $R/long_ab.py "$@" 2>&1 | tail -1 | tee -a $OUT/call5.jsonl; }
ab ab_base/src --length 12m
ab src --length 12m
ab ab_base/src --length 1m
ab src --length 1m
export PYTHONPATH=src
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "route or threshold" \
  > $OUT/call5-tests.txt 2>&1
tail -1 $OUT/call5-tests.txt
timeout 240 python3 benchmarks/attention.py --shape long --index beam --lengths 128k,1m,12m --reps 3 \
  --backward-max-len 0 --flex-max-len 0 --time-budget 300 --tag attention-long-beam --out $OUT \
  > $OUT/call5-long-beam.log 2>&1
grep -h "N=" $OUT/call5-long-beam.log
