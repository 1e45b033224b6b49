# Call 5: items 99 (without (d)) and 100 against aeacb74 (ab_base/src): the 128K forward+backward and
# the 1M attention phase, alternating trees; the 1M forward as one call; then the GPU tests of the routed
# and query-major kernels.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call5-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call5-$name.log)"; grep -E "_routed_|_merge|_sparse_attention_fwd|_threshold" $OUT/call5-$name.log
}
run fwdbwd128k-base ab_base/src --length 128k --backward
run fwdbwd128k-new src --length 128k --backward
run fwdbwd128k-base-2 ab_base/src --length 128k --backward
run fwdbwd128k-new-2 src --length 128k --backward
run attn1m-new src --length 1m --phase attention
run fwd1m-new src --length 1m
PYTHONPATH=src timeout 300 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py tests/ops/test_triton_attention.py > $OUT/call5-tests.txt 2>&1
tail -1 $OUT/call5-tests.txt
