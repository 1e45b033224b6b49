# Call 1: the fixed part's kernel merging each chunk's routed partials (no merge kernel) against aeacb74
# (ab_base/src): the attention phase at 1M twice each, alternating trees, the 1M forward as one call, the
# 128K forward+backward; then the GPU tests of the routed kernels.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call1-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call1-$name.log)"; grep -E "_routed_|_merge|_sparse_attention_fwd" $OUT/call1-$name.log
}
run attn1m-base ab_base/src --length 1m --phase attention
run attn1m-new src --length 1m --phase attention
run attn1m-base-2 ab_base/src --length 1m --phase attention
run attn1m-new-2 src --length 1m --phase attention
run fwd1m-new src --length 1m
run fwdbwd128k-base ab_base/src --length 128k --backward
run fwdbwd128k-new src --length 128k --backward
PYTHONPATH=src timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py > $OUT/call1-tests.txt 2>&1
tail -1 $OUT/call1-tests.txt
