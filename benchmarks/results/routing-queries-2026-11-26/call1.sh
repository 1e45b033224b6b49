# Call 1 (NOTES item 102): the routing queries summed by a Triton kernel (this tree, "B") or inside the
# threshold kernel (ab_fused/src, "A") against 79a2b6e (ab_base/src): the picks at 1M, the select phase at
# 1M alternating trees, the 1M forward as one call, and the GPU tests of the routing kernels.
export OUT PYTHONUNBUFFERED=1
D=benchmarks/results/routing-queries-2026-11-26
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 12 "$@" > $OUT/call1-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call1-$name.log)"
  grep -E "_threshold|reduce_kernel|_sum_query|radix|Cat" $OUT/call1-$name.log
}
PYTHONPATH=ab_base/src timeout 150 python3 $D/sel_check.py save /tmp/picks1m.pt 1m
PYTHONPATH=src timeout 150 python3 $D/sel_check.py compare /tmp/picks1m.pt 1m
PYTHONPATH=ab_fused/src timeout 150 python3 $D/sel_check.py compare /tmp/picks1m.pt 1m
run select1m-base ab_base/src --length 1m --phase select
run select1m-B src --length 1m --phase select
run select1m-A ab_fused/src --length 1m --phase select
run select1m-base-2 ab_base/src --length 1m --phase select
run select1m-B-2 src --length 1m --phase select
run select1m-A-2 ab_fused/src --length 1m --phase select
run fwd1m-B src --length 1m
run fwd1m-A ab_fused/src --length 1m
PYTHONPATH=src timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "sum_query_heads or threshold or route" > $OUT/call1-tests.txt 2>&1
tail -1 $OUT/call1-tests.txt
