# Call 3: the routed kernels with fewer instructions a step (the slot count a constant, one reciprocal a
# row, the scale in the exponent's FMA, ex2.approx.ftz, no per-score masks where a segment needs none;
# this tree) against c7b3375 (ab_base/src), alternating; two stages on the new forward; the GPU tests.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call3-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call3-$name.log)"; grep -E "_routed_|_merge" $OUT/call3-$name.log
}
run fwd1m-base ab_base/src --length 1m
run fwd1m-new src --length 1m
run fwd1m-base-2 ab_base/src --length 1m
run fwd1m-new-2 src --length 1m
run fwdbwd128k-base ab_base/src --length 128k --backward
run fwdbwd128k-new src --length 128k --backward
run fwd1m-new-stages2 src --length 1m --set triton_routed._ROUTED_NUM_STAGES=2
PYTHONPATH=src timeout 200 python3 -m pytest -q tests/ops/test_triton_routed.py tests/ops/test_triton_attention.py > $OUT/call3-tests.txt 2>&1
tail -1 $OUT/call3-tests.txt
