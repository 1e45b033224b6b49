# Call 3: the routed kernel's step in fewer instructions (NOTES item 99) against aeacb74 (ab_base/src):
# the attention phase at 1M twice each, alternating trees; the 128K forward+backward; the 1M forward as
# one call; then the GPU tests of the routed and query-major kernels.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call3-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call3-$name.log)"; grep -E "_routed_|_merge|_sparse_attention_fwd" $OUT/call3-$name.log
}
run attn1m-base ab_base/src --length 1m --phase attention
run attn1m-new src --length 1m --phase attention
run attn1m-base-2 ab_base/src --length 1m --phase attention
run attn1m-new-2 src --length 1m --phase attention
run fwdbwd128k-new src --length 128k --backward
run fwd1m-new src --length 1m
PYTHONPATH=src timeout 330 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py tests/ops/test_triton_attention.py -x > $OUT/call3-tests.txt 2>&1
tail -1 $OUT/call3-tests.txt
