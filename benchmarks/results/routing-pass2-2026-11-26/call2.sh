# Call 2: the committed candidate (float count with a per-row floor, interior chunks' summary pointers
# advanced, 168-register cap for one summary a block) against 77d1df3 (ab_base/src): the router alone at
# several shapes, the 1M forward's profile, and the GPU tests of the routing kernels.
export OUT PYTHONUNBUFFERED=1
D=benchmarks/results/routing-pass2-2026-11-26
run() {  # name src tag args...
  name=$1; src=$2; tag=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $D/ab.py --name $name --ref /tmp/ref-$tag.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call2.jsonl
}
CAP=triton_select._THRESHOLD_MAX_REGISTERS
run base ab_base/src 1m --length 1m
run new src 1m --length 1m
run new-nocap src 1m --length 1m --set $CAP=0
run base-2 ab_base/src 1m --length 1m
run new-2 src 1m --length 1m
for len in 128k 16k; do run base ab_base/src $len --length $len; run new src $len --length $len; done
run base ab_base/src small --shape small --length 12m --queries 64k
run new src small --shape small --length 12m --queries 64k
run base ab_base/src nano --shape nano --length 1m --sub-block 4
run new src nano --shape nano --length 1m --sub-block 4
for tree in ab_base/src src; do
  PYTHONPATH=$tree timeout 150 python3 scripts/profile_attention.py --length 1m --top 8 > $OUT/call2-fwd1m-${tree%%/*}.log 2>&1
  echo "$tree: $(grep -E 'per call' $OUT/call2-fwd1m-${tree%%/*}.log)"; grep -E "_threshold|_routed_|_merge" $OUT/call2-fwd1m-${tree%%/*}.log
done
PYTHONPATH=src timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "threshold or flat or route or select" > $OUT/call2-tests.txt 2>&1
tail -1 $OUT/call2-tests.txt
