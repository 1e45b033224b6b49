# Call 4: call 3's kernels plus int32 partial-row indices and an unmasked q gather (808 instructions a
# step at a 168-register cap, 773 without), with the cap (3 programs per SM) and without it (2), against
# c7b3375 (ab_base/src); then the GPU tests of the routed and query-major kernels.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call4-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call4-$name.log)"; grep -E "_routed_|_merge" $OUT/call4-$name.log
}
run fwd1m-base ab_base/src --length 1m
run fwd1m-cap168 src --length 1m
run fwd1m-nocap src --length 1m --set triton_routed._ROUTED_MAX_REGISTERS=0
run fwd1m-cap168-2 src --length 1m
run fwdbwd128k-new src --length 128k --backward
PYTHONPATH=src timeout 280 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py tests/ops/test_triton_attention.py > $OUT/call4-tests.txt 2>&1
tail -1 $OUT/call4-tests.txt
