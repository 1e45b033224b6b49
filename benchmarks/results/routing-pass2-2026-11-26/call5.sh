# Call 5: the committed code (launch constants from `_threshold_launch`, shared with
# scripts/kernel_resources.py): the router at 1M against 77d1df3 (ab_base/src), and the GPU tests of
# the routing and attention kernels.
export OUT PYTHONUNBUFFERED=1
D=benchmarks/results/routing-pass2-2026-11-26
run() {  # name src tag args...
  name=$1; src=$2; tag=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $D/ab.py --name $name --ref /tmp/ref-$tag.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call5.jsonl
}
run base ab_base/src 1m --length 1m
run new src 1m --length 1m
run base ab_base/src nano --shape nano --length 1m --sub-block 4
run new src nano --shape nano --length 1m --sub-block 4
PYTHONPATH=src timeout 400 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py > $OUT/call5-tests.txt 2>&1
tail -1 $OUT/call5-tests.txt
