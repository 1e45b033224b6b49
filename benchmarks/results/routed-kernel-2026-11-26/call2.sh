# Call 2: the routed kernels with the slot count as a constant (this tree) against c7b3375 (ab_base/src),
# then register caps (maxnreg: 3 or 4 forward programs per SM, 2 backward), then the GPU tests.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call2-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call2-$name.log)"; grep -E "_routed_|_merge" $OUT/call2-$name.log
}
run fwd1m-base ab_base/src --length 1m
run fwd1m-slots src --length 1m
run fwd1m-slots-reg168 src --length 1m --set triton_routed._ROUTED_MAXNREG=168
run fwd1m-slots-reg128 src --length 1m --set triton_routed._ROUTED_MAXNREG=128
run fwd1m-base-again ab_base/src --length 1m
run fwdbwd128k-base ab_base/src --length 128k --backward
run fwdbwd128k-slots src --length 128k --backward
run fwdbwd128k-slots-bwdreg128 src --length 128k --backward --set triton_routed._BWD_MAXNREG=128
PYTHONPATH=src timeout 180 python3 -m pytest -q tests/ops/test_triton_routed.py > $OUT/call2-tests.txt 2>&1
tail -1 $OUT/call2-tests.txt
