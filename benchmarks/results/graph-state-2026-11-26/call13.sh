# Call 13: the `small` prefill on the current code (issue 3: 1M in at most 5 s and 10x dense, 12M in at
# most 90 s). A 4M SSA prefill first compiles the kernels' long-length specializations (NOTES item 74).
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p $OUT/warm $OUT/prefill
( time timeout 120 python3 benchmarks/decode.py --device cuda --only prefill --skip-dense --prefill-lengths 4194304 --out $OUT/warm ) > $OUT/call13-warm.log 2>&1
grep -E "\| prefill \||real" $OUT/call13-warm.log
( time timeout 420 python3 benchmarks/decode.py --device cuda --only prefill --prefill-lengths 131072 1048576 4194304 12582912 --out $OUT/prefill ) > $OUT/call13-prefill.log 2>&1
grep -E "\| prefill \||real|speedup" $OUT/call13-prefill.log
